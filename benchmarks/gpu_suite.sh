#!/usr/bin/env bash
# Runs the GPU jobs named on the command line in one call on a lent GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_suite.sh check lm374m vision scaling lra-listops lra-pathfinder mqar
# (scaling runs scaling-ddp, scaling-fsdp and scaling-fsdp-ckpt; each can also be named alone; ops, train-8192
# and vision-chunked are further jobs). LRA_MINUTES, LRA_TOTAL_MINUTES, LRA_BACKEND, LRA_FLAGS (more flags of
# lra_learning.py), MQAR_FLAGS and FLA_BUDGET_S tune the jobs.
# lra-variants runs LRA_VARIANTS="tag:flags;..." (Pathfinder runs of lra_learning.py) side by side on one GPU;
# pathfinder-ablation runs PF_ABLATION_VARIANTS="tag:json;..." (benchmarks/pathfinder_ablation.py, flags in
# PF_ABLATION_FLAGS) likewise. config-seeds fits CONFIG (default configs/lra/pathfinder_grid_conv.yaml) at
# CONFIG_SEEDS (default "0 1") side by side through the hgrn2 CLI with CONFIG_FLAGS, then tests each
# (benchmarks/config_seeds.py); the report and each seed's log and last checkpoint come back in $OUT.
# On two GPUs, scaling-2gpu: the 374m LM on one GPU, then on two under DDP and under FSDP, at one global batch.
# Wheels the machine lacks (jsonargparse, datasets, fla, ...) are installed from .wheels/ when it exists.
# LRA data drawn beforehand (benchmarks/lra_learning.py's runs/lra_learning/<name>/) can be carried packed as
# runs/lra_learning/<name>.tar.gz, or Pathfinder-32 as runs/lra_learning/pathfinder-<N>-s<seed>.pfpack.xz (with
# PF_IMAGES=N; pathfinder-c6-<N>-s<seed> for --pathfinder-contour-length 6): the LRA jobs unpack it and the script
# reuses it instead of drawing it again.
# Each job writes its JSON to benchmarks/results/ and copies it to $OUT; all output goes to $OUT/suite.log.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
mkdir -p "$OUT" "$RESULTS"
if compgen -G ".wheels/*.whl" >/dev/null; then
  if [ ! -e /tmp/site/.installed ]; then  # once per machine, so that two suites can run side by side
    pip install -q --no-deps --target /tmp/site .wheels/*.whl 2>&1 | tail -1 && touch /tmp/site/.installed
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Triton's cache, with autotuning results, goes back in $OUT/triton-cache.tar.gz; carried to the next call as
# .triton-cache.tar.gz it spares fla minutes of autotuning. Scripts record the cache's state in their JSON.
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=$PWD/.triton-cache
mkdir -p "$TRITON_CACHE_DIR"
[ -f .triton-cache.tar.gz ] && tar -xzf .triton-cache.tar.gz -C "$TRITON_CACHE_DIR"
save_cache() {
  tar -czf "$OUT/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
  if [ "$(stat -c %s "$OUT/triton-cache.tar.gz")" -gt $((16 * 1024 * 1024)) ]; then
    # too large to carry: keep the autotuning results alone, so that the next call compiles only the chosen configs
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/triton-cache.tar.gz" --null -T -)
    echo "Triton cache over 16 MiB: only its autotuning results returned"
  fi
}
trap save_cache EXIT
trap "exit 143" TERM INT

run() {  # run NAME COMMAND...: time a job, keep its log, never stop the suite
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/suite.log" | tail -25
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

unpack_lra_data() {
  # data generated beforehand and carried as runs/lra_learning/<name>.tar.gz are unpacked where the script looks
  for archive in runs/lra_learning/*.tar.gz; do
    [ -f "$archive" ] && [ ! -d "${archive%.tar.gz}" ] && tar -xzf "$archive" -C runs/lra_learning
  done
  for pack in runs/lra_learning/*.pfpack.xz; do  # Pathfinder-32 packed by datamodules.lra.pathfinder_pack
    [ -f "$pack" ] && [ ! -d "${pack%.pfpack.xz}" ] &&
      python -m datamodules.lra.pathfinder_pack unpack "$pack" "${pack%.pfpack.xz}/pathfinder32"
  done
  return 0
}

jobs=("$@")
for ((i = 0; i < ${#jobs[@]}; i++)); do
  job=${jobs[i]}
  case $job in
    lm374m)
      run lm374m python -m hgrn2 fit --config configs/lm/374m.yaml --trainer.max_steps 200 \
        --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir runs/lm_374m \
        --trainer.enable_progress_bar false
      cp runs/lm_374m/lightning_logs/version_0/metrics.csv "$OUT/lm374m-metrics.csv" 2>/dev/null ;;
    vision)
      run vision python benchmarks/vision_throughput.py --expand-ratios 2 16
      cp "$RESULTS"/*-vision.json "$OUT/" ;;
    vision-chunked)  # the chunked kernels at every expand ratio, against the kernels `vision` (auto) picks
      run vision-chunked python benchmarks/vision_throughput.py --expand-ratios 2 16 --backend triton \
        --out "$RESULTS/vision-chunked.json"
      cp "$RESULTS"/vision-chunked.json "$OUT/" ;;
    ops)  # kernels against fla: its first call autotunes for minutes, so give this job a call of its own
      run ops python benchmarks/ops.py --out "$RESULTS" --fla-budget-s "${FLA_BUDGET_S:-200}"
      cp "$RESULTS"/*-ops.json "$OUT/" ;;
    train-8192)
      run train-8192 python benchmarks/train.py --models hgrn2,llama,fla --shapes 8192x2 --out "$RESULTS/T8192"
      cp "$RESULTS"/T8192/*-train.json "$OUT/" ;;
    scaling) jobs+=(scaling-ddp scaling-fsdp scaling-fsdp-ckpt) ;;
    scaling-ddp | scaling-fsdp | scaling-fsdp-ckpt)
      flags="--strategy ${job#scaling-}"; flags=${flags/fsdp-ckpt/fsdp --checkpointing}
      run "$job" python benchmarks/scaling.py --devices 1 --steps 100 $flags --out-dir "$RESULTS"
      cp "$RESULTS"/*x1-*.json "$OUT/" ;;
    scaling-2gpu)
      touch "$OUT/.started"
      for setting in "1 ddp" "2 ddp" "2 fsdp"; do
        set -- $setting
        run "scaling-$2-x$1" python benchmarks/scaling.py --devices "$1" --strategy "$2" --steps 100 --out-dir "$RESULTS"
      done
      find "$RESULTS" -maxdepth 1 -name 'H*x[12]-*.json' -newer "$OUT/.started" -exec cp {} "$OUT/" \; ;;
    check)
      run check python benchmarks/gpu_check.py --out "$RESULTS"
      cp "$RESULTS"/*-gpu-check.log "$OUT/" ;;
    lra-variants)  # LRA_VARIANTS="tag:flags;tag:flags": Pathfinder variants of lra_learning.py side by side
      unpack_lra_data
      IFS=';' read -ra variants <<<"${LRA_VARIANTS:?set LRA_VARIANTS}"
      for variant in "${variants[@]}"; do
        python benchmarks/lra_learning.py --out "$RESULTS" --tasks pathfinder --minutes "${LRA_MINUTES:-3}" \
          --total-minutes "${LRA_TOTAL_MINUTES:-${LRA_MINUTES:-3}}" --checkpoint-dir runs/lra_learning/ckpt \
          --pathfinder-images "${PF_IMAGES:-40000}" --workers $(($(nproc) / ${#variants[@]})) \
          --tag "${variant%%:*}" ${variant#*:} 2>&1 | grep --line-buffered -v -i "warn" >>"$OUT/lra-variants.log" &
      done
      wait
      grep -h "epoch\|test accuracy" "$OUT/lra-variants.log"
      cp "$RESULTS"/*-lra.json "$OUT/"
      mkdir -p "$OUT/lra-ckpt" && cp runs/lra_learning/ckpt/*.ckpt "$OUT/lra-ckpt/" ;;
    pathfinder-ablation)  # PF_ABLATION_VARIANTS="tag:json;tag:json" on PF_IMAGES curv_baseline images, side by side
      unpack_lra_data
      IFS=';' read -ra variants <<<"${PF_ABLATION_VARIANTS:?set PF_ABLATION_VARIANTS}"
      run pathfinder-ablation python benchmarks/pathfinder_ablation.py --difficulty curv_baseline \
        --data-dir "runs/lra_learning/pathfinder-c6-${PF_IMAGES:-100000}-s0/pathfinder32" --workers "$(nproc)" \
        --variants "${variants[@]}" ${PF_ABLATION_FLAGS:-} --out "$RESULTS/pathfinder-ablation.json"
      cp "$RESULTS/pathfinder-ablation.json" "$OUT/" ;;
    config-seeds)  # CONFIG (an hgrn2 YAML) fit at CONFIG_SEEDS side by side, each tested; CONFIG_FLAGS: more CLI flags
      unpack_lra_data
      config=${CONFIG:-configs/lra/pathfinder_grid_conv.yaml}
      run config-seeds python benchmarks/config_seeds.py --config "$config" --seeds ${CONFIG_SEEDS:-0 1} \
        --run-dir runs/config_seeds -- ${CONFIG_FLAGS:-}
      cp "$RESULTS"/*-"$(basename "${config%.yaml}")"-seeds.json "$OUT/"
      mkdir -p "$OUT/config-seeds"
      for seed_dir in runs/config_seeds/s*/; do  # each seed's log and last checkpoint, as config-seeds/s<seed>.*
        cp "${seed_dir}run.log" "$OUT/config-seeds/$(basename "$seed_dir").log"
        checkpoint=$(ls -t "$seed_dir"fit/version_*/checkpoints/*.ckpt 2>/dev/null | head -1)
        [ -n "$checkpoint" ] && cp "$checkpoint" "$OUT/config-seeds/$(basename "$seed_dir").ckpt"
      done ;;
    lra-listops | lra-pathfinder)
      unpack_lra_data
      # LRA_TOTAL_MINUTES spreads one schedule over several calls: the checkpoint comes back in $OUT/lra-ckpt/;
      # carried to the next call as runs/lra_learning/ckpt/<task>.ckpt, training resumes from it
      # LRA_RESUME=1: a call that must continue a run stops here when the checkpoint did not come with it
      resume=()
      [ -n "${LRA_TOTAL_MINUTES:-}" ] && resume=(--total-minutes "$LRA_TOTAL_MINUTES" --checkpoint-dir runs/lra_learning/ckpt)
      if [ -n "${LRA_RESUME:-}" ] && [ ! -f "runs/lra_learning/ckpt/${job#lra-}.ckpt" ]; then
        echo "=== $job: no runs/lra_learning/ckpt/${job#lra-}.ckpt to resume from; carry it"; continue
      fi
      run "$job" python benchmarks/lra_learning.py --out "$RESULTS" --tasks "${job#lra-}" --minutes "${LRA_MINUTES:-3}" \
        --backend "${LRA_BACKEND:-auto}" --pathfinder-images "${PF_IMAGES:-40000}" "${resume[@]}" ${LRA_FLAGS:-}
      cp "$RESULTS"/*-lra.json "$OUT/"
      [ -n "${LRA_TOTAL_MINUTES:-}" ] && mkdir -p "$OUT/lra-ckpt" && cp runs/lra_learning/ckpt/*.ckpt "$OUT/lra-ckpt/" ;;
    mqar)
      run mqar python benchmarks/mqar_sweep.py --out "$RESULTS/mqar" ${MQAR_FLAGS:-}
      cp "$RESULTS"/mqar/* "$OUT/" 2>/dev/null ;;
    *) echo "unknown job $job" ;;
  esac
done
