#!/usr/bin/env bash
# Runs the GPU jobs named on the command line in one call on a lent GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_suite.sh lm374m vision scaling lra-listops lra-pathfinder mqar
# Wheels the machine lacks (jsonargparse, datasets, fla, ...) are installed from .wheels/ when it exists.
# Each job writes its JSON to benchmarks/results/ and copies it to $OUT; all output goes to $OUT/suite.log.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
mkdir -p "$OUT" "$RESULTS"
if compgen -G ".wheels/*.whl" >/dev/null; then
  pip install -q --no-deps --target /tmp/site .wheels/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

run() {  # run NAME COMMAND...: time a job, keep its log, never stop the suite
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/suite.log" | tail -25
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

for job in "$@"; do
  case $job in
    lm374m)
      run lm374m python -m hgrn2 fit --config configs/lm/374m.yaml --trainer.max_steps 200 \
        --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir runs/lm_374m \
        --trainer.enable_progress_bar false
      cp runs/lm_374m/lightning_logs/version_0/metrics.csv "$OUT/lm374m-metrics.csv" 2>/dev/null ;;
    vision)
      run vision python benchmarks/vision_throughput.py --expand-ratios 2 16
      cp "$RESULTS"/*-vision.json "$OUT/" ;;
    scaling)
      for flags in "--strategy ddp" "--strategy fsdp" "--strategy fsdp --checkpointing"; do
        run "scaling $flags" python benchmarks/scaling.py --devices 1 --steps 100 $flags --out-dir "$RESULTS"
      done
      cp "$RESULTS"/*x1-*.json "$OUT/" ;;
    lra-listops | lra-pathfinder)
      run "$job" python benchmarks/lra_learning.py --out "$RESULTS" --tasks "${job#lra-}" --minutes "${LRA_MINUTES:-3}"
      cp "$RESULTS"/*-lra.json "$OUT/" ;;
    mqar)
      run mqar python benchmarks/mqar_sweep.py --out "$RESULTS/mqar" ${MQAR_FLAGS:-}
      cp "$RESULTS"/mqar/* "$OUT/" 2>/dev/null ;;
    *) echo "unknown job $job" ;;
  esac
done
