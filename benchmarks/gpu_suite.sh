#!/usr/bin/env bash
# Runs the benchmark jobs named on the command line, one after another, on a GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_suite.sh check lm374m vision scaling ops
# Jobs: check (every `gpu`-marked test but the fuzz: the kernels at full size against float64, the LRA encoder, the
# fused LM), fuzz (the fuzz's GPU set, FUZZ_WORKERS processes, HGRN2_FUZZ_SECONDS each), parity (fla_parity.py),
# lm374m (200 steps of configs/lm/374m.yaml through hgrn2 fit), vision, vision-chunked, small-state (training steps
# of ListOps, Pathfinder-32 and HGRN2-Tiny against their target rates, ListOps' kernels profiled),
# small-state-compile (SMALL_STATE_JOBS, default pathfinder,vision, with torch.compile), decode (the decoding step
# and the public op at T = 1, fla's step beside them), ops (kernels against fla; FLA_BUDGET_S caps fla's
# autotuning), train-ratios (the 374M LM, ours with and without the precise path against fla's, T = 2048 x B = 8
# and T = 8192 x B = 2), train-8192, scaling (scaling-ddp, scaling-fsdp and scaling-fsdp-ckpt, each also a job
# alone) and, on two GPUs, scaling-2gpu (the 374m LM on one GPU, then on two under DDP and under FSDP, at one global
# batch). The research studies have their own suite: experiments/gpu_suite.sh.
# Each job writes its JSON or log to benchmarks/results/ and copies it to $OUT; all output goes to $OUT/suite.log.
set -uo pipefail
RESULTS=benchmarks/results
source "$(dirname "$0")/suite_setup.sh"

gpu_slug() { nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-'; }

jobs=("$@")
for ((i = 0; i < ${#jobs[@]}; i++)); do
  job=${jobs[i]}
  case $job in
    check)  # the project's own addopts load nbval, which a GPU machine need not have
      log="$RESULTS/$(gpu_slug)-gpu-check.log"
      run check bash -c "HGRN2_TEST_GPU=1 python -m pytest -o addopts='' -p no:cacheprovider -m gpu -rP tests \
        --ignore=tests/ops/test_fuzz.py 2>&1 | tee '$log'"
      cp "$log" "$OUT/" ;;
    fuzz)  # the fuzz's GPU set at full size against the float64 loop, spread over FUZZ_WORKERS pytest workers
      log="$OUT/$(gpu_slug)-fuzz-gpu.log"  # written where it comes back even if the suite is stopped
      rm -f "$log"
      run fuzz bash -c "HGRN2_TEST_GPU=1 HGRN2_FUZZ_LOG='$log' python -m pytest -o addopts='' -p no:cacheprovider \
        -m gpu -n ${FUZZ_WORKERS:-8} -q tests/ops/test_fuzz.py"
      # the workers' counts summed: the word after each case's seconds is its verdict
      awk '!/^#/ { for (i = 1; i < NF; i++) if ($i ~ /^[0-9.]+s$/) { n[$(i + 1)]++; break } }
        END { line = "# all workers:"; for (v in n) line = line " " n[v] " " v; print line }' "$log" | tee -a "$log"
      [ "$log" -ef "$RESULTS/$(basename "$log")" ] || cp "$log" "$RESULTS/" ;;
    parity)  # fla's HGRN2 models converted both ways, fla on its chunked and on its step-by-step kernels
      for mode in chunk fused_recurrent; do
        run "parity-$mode" python benchmarks/fla_parity.py --fla-attn-mode "$mode" \
          --out "$RESULTS/$(gpu_slug)-fla-parity-$mode.json"
      done
      cp "$RESULTS/$(gpu_slug)"-fla-parity-*.json "$OUT/" ;;
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
    small-state)  # the profile runs after the timed steps and does not slow them
      run small-state python benchmarks/small_state_throughput.py --profile listops
      cp "$RESULTS"/*-small-state.json "$OUT/" ;;
    small-state-compile)  # SMALL_STATE_JOBS (default pathfinder,vision) with each block through torch.compile
      run small-state-compile python benchmarks/small_state_throughput.py --jobs "${SMALL_STATE_JOBS:-pathfinder,vision}" \
        --compile --out "$RESULTS/small-state-compile.json"
      cp "$RESULTS"/small-state-compile.json "$OUT/" ;;
    decode)  # the decoding step and the public op at T = 1, fla's step kernel beside them when installed
      run decode python benchmarks/ops.py --decode-only --out "$RESULTS"
      cp "$RESULTS"/*-ops-decode.json "$OUT/" ;;
    ops)  # kernels against fla: its first call autotunes for minutes
      run ops python benchmarks/ops.py --out "$RESULTS" --fla-budget-s "${FLA_BUDGET_S:-200}"
      cp "$RESULTS"/*-ops.json "$OUT/" ;;
    train-ratios)  # the 374M LM against fla's at both of the kernel targets' shapes, the precise path beside
      run train-ratios python benchmarks/train.py --models hgrn2,hgrn2-precise,fla --shapes 2048x8,8192x2 \
        --out "$RESULTS/ratios"
      cp "$RESULTS"/ratios/*-train.json "$OUT/" ;;
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
    *) echo "unknown job $job (experiments/gpu_suite.sh runs the research studies)" ;;
  esac
done
