#!/usr/bin/env bash
# Runs the research jobs named on the command line, one after another, on a GPU machine, from the repository root:
#   OUT=/some/dir bash experiments/gpu_suite.sh lra-listops lra-pathfinder mqar
# Jobs and their settings:
# - lra-listops, lra-pathfinder: experiments/lra_learning.py for LRA_MINUTES (default 3); LRA_TOTAL_MINUTES spreads
#   one schedule over several suites (the checkpoint comes back in $OUT/lra-ckpt/; put back as
#   runs/lra_learning/ckpt/<task>.ckpt, training resumes from it; LRA_RESUME=1 stops when it is missing);
#   LRA_BACKEND, PF_IMAGES (Pathfinder images, default 40000) and LRA_FLAGS (more flags of lra_learning.py).
# - lra-variants: LRA_VARIANTS="tag:flags;..." (Pathfinder runs of lra_learning.py) side by side on one GPU.
# - pathfinder-ablation: PF_ABLATION_VARIANTS="tag:json;..." (experiments/pathfinder_ablation.py, flags in
#   PF_ABLATION_FLAGS) side by side on PF_IMAGES curv_baseline images.
# - config-seeds: CONFIG (default configs/lra/pathfinder_grid_conv.yaml) fitted at CONFIG_SEEDS (default "0 1") side
#   by side through the hgrn2 CLI with CONFIG_FLAGS, then each tested (experiments/config_seeds.py); the report and
#   each seed's log and last checkpoint come back in $OUT.
# - mqar: experiments/mqar_sweep.py with MQAR_FLAGS.
# - compile-parity: experiments/compile_parity.py (PARITY_FLAGS: its flags, e.g. "--models vision --backends
#   inductor aot_eager").
# - listops-launch: ListOps training steps/s under launch settings of the chunk kernels (experiments/listops_launch.py),
#   LISTOPS_LAUNCH="KEY=V1,V2 KEY=V1;..." (each ';'-separated group's combinations).
# - listops-fit: one part of the ListOps fit at the paper's budget, chained over suites (see the job).
# - small-state-ab: benchmarks/small_state_throughput.py (flags in SMALL_STATE_FLAGS, default the Pathfinder and
#   vision jobs) from an earlier tree and from this one, alternately AB_ROUNDS times (default 2), so that a change
#   of rate between two versions is measured on one machine; AB_ARCHIVE is a `git archive` of the earlier commit
#   (e.g. `git archive -o runs/ab/old.tar.gz aa50c62`). The reports come back as small-state-ab-{old,new}-<n>.json.
# - listops-data: the LRA ListOps splits at the paper's sizes (96,000 / 2,000 / 2,000 expressions, the generator's
#   defaults and seed) in data/lra/listops, unless already there; the same files on every machine, so a fit chained
#   over several suites (config-seeds with CONFIG=configs/lra/listops.yaml, --trainer.max_time in CONFIG_FLAGS and,
#   from the second suite on, --ckpt_path <the last suite's checkpoint>) resumes on the data it started on.
# - kernel-profile: per-kernel CUDA times of the chunked op, plain and gated (experiments/kernel_profile.py), at
#   16K tokens (T = 1K) and 64K tokens (T = 4K); kernel-variants: experiments/kernel_versions.py --variants --fla
#   (KERNEL_VARIANTS: a comma-separated choice of its variants, default all; KERNEL_SHAPES: TOKENSxT,... to time);
#   kernel-ncu: Nsight Compute's throughput, occupancy, launch, warp-stall and memory sections of the chunk kernels
#   (NCU_KERNELS, a regex, and NCU_LAUNCHES choose which and how many launches) as CSV.
#   kernel-ncu-source: Nsight Compute's per-instruction counters and warp-stall samples of the chunk kernels of one
#   plain forward + backward (B = 16, T = 4096; NCU_KERNELS, default dqk_bwd|output_fwd|state_walk): the report
#   (kernel-source.ncu-rep) and its source page as CSV, SASS and Python lines (kernel-source-*.csv).
# - small-state-kernels: experiments/small_state_profile.py (each scan of a four-direction layer at Pathfinder-32's
#   and HGRN2-Tiny's shapes, timed) and Nsight Compute's sections of Pathfinder's eight step-by-step launches.
# LRA data drawn beforehand (experiments/lra_learning.py's runs/lra_learning/<name>/) can be brought packed as
# runs/lra_learning/<name>.tar.gz, or Pathfinder-32 as runs/lra_learning/pathfinder-<N>-s<seed>.pfpack.xz (with
# PF_IMAGES=N; pathfinder-c6-<N>-s<seed> for --pathfinder-contour-length 6): the LRA jobs unpack it and the script
# reuses it instead of drawing it again.
# Each job writes its JSON to experiments/results/ and copies it to $OUT; all output goes to $OUT/suite.log.
set -uo pipefail
RESULTS=experiments/results
source "$(dirname "$0")/../benchmarks/suite_setup.sh"

unpack_lra_data() {
  # data generated beforehand as runs/lra_learning/<name>.tar.gz are unpacked where the script looks
  for archive in runs/lra_learning/*.tar.gz; do
    [ -f "$archive" ] && [ ! -d "${archive%.tar.gz}" ] && tar -xzf "$archive" -C runs/lra_learning
  done
  for pack in runs/lra_learning/*.pfpack.xz; do  # Pathfinder-32 packed by datamodules.lra.pathfinder_pack
    [ -f "$pack" ] && [ ! -d "${pack%.pfpack.xz}" ] &&
      python -m datamodules.lra.pathfinder_pack unpack "$pack" "${pack%.pfpack.xz}/pathfinder32"
  done
  return 0
}

listops_data() {
  # the ListOps splits at the paper's sizes in data/lra/listops, unless already there
  if [ ! -f data/lra/listops/basic_test.tsv ]; then
    run listops-data python -m datamodules.lra.generate_listops --out data/lra/listops --workers "$(nproc)"
  fi
}

for job in "$@"; do
  case $job in
    lra-variants)
      unpack_lra_data
      IFS=';' read -ra variants <<<"${LRA_VARIANTS:?set LRA_VARIANTS}"
      for variant in "${variants[@]}"; do
        python experiments/lra_learning.py --out "$RESULTS" --tasks pathfinder --minutes "${LRA_MINUTES:-3}" \
          --total-minutes "${LRA_TOTAL_MINUTES:-${LRA_MINUTES:-3}}" --checkpoint-dir runs/lra_learning/ckpt \
          --pathfinder-images "${PF_IMAGES:-40000}" --workers $(($(nproc) / ${#variants[@]})) \
          --tag "${variant%%:*}" ${variant#*:} 2>&1 | grep --line-buffered -v -i "warn" >>"$OUT/lra-variants.log" &
      done
      wait
      grep -h "epoch\|test accuracy" "$OUT/lra-variants.log"
      cp "$RESULTS"/*-lra.json "$OUT/"
      mkdir -p "$OUT/lra-ckpt" && cp runs/lra_learning/ckpt/*.ckpt "$OUT/lra-ckpt/" ;;
    pathfinder-ablation)
      unpack_lra_data
      IFS=';' read -ra variants <<<"${PF_ABLATION_VARIANTS:?set PF_ABLATION_VARIANTS}"
      run pathfinder-ablation python experiments/pathfinder_ablation.py --difficulty curv_baseline \
        --data-dir "runs/lra_learning/pathfinder-c6-${PF_IMAGES:-100000}-s0/pathfinder32" --workers "$(nproc)" \
        --variants "${variants[@]}" ${PF_ABLATION_FLAGS:-} --out "$RESULTS/pathfinder-ablation.json"
      cp "$RESULTS/pathfinder-ablation.json" "$OUT/" ;;
    config-seeds)
      unpack_lra_data
      config=${CONFIG:-configs/lra/pathfinder_grid_conv.yaml}
      run config-seeds python experiments/config_seeds.py --config "$config" --seeds ${CONFIG_SEEDS:-0 1} \
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
      resume=()
      [ -n "${LRA_TOTAL_MINUTES:-}" ] && resume=(--total-minutes "$LRA_TOTAL_MINUTES" --checkpoint-dir runs/lra_learning/ckpt)
      if [ -n "${LRA_RESUME:-}" ] && [ ! -f "runs/lra_learning/ckpt/${job#lra-}.ckpt" ]; then
        echo "=== $job: no runs/lra_learning/ckpt/${job#lra-}.ckpt to resume from; put it there first"; continue
      fi
      run "$job" python experiments/lra_learning.py --out "$RESULTS" --tasks "${job#lra-}" --minutes "${LRA_MINUTES:-3}" \
        --backend "${LRA_BACKEND:-auto}" --pathfinder-images "${PF_IMAGES:-40000}" "${resume[@]}" ${LRA_FLAGS:-}
      cp "$RESULTS"/*-lra.json "$OUT/"
      [ -n "${LRA_TOTAL_MINUTES:-}" ] && mkdir -p "$OUT/lra-ckpt" && cp runs/lra_learning/ckpt/*.ckpt "$OUT/lra-ckpt/" ;;
    listops-data)
      listops_data ;;
    listops-fit)
      # one part of the ListOps fit at the paper's budget (configs/lra/listops.yaml, 37,500 steps): the data as in
      # listops-data, then `hgrn2 fit` for at most LISTOPS_SECONDS (default 480; LISTOPS_FLAGS: more of its flags),
      # resumed from runs/lra_listops/checkpoints/last.ckpt when it is there (saved every 250 steps). The
      # checkpoints and this part's metrics come back in $OUT/listops/ (put the checkpoints back in
      # runs/lra_listops/checkpoints/ for the next part); once the fit has reached LISTOPS_STEPS (default 37,500),
      # `hgrn2 test` scores the last and the best checkpoint.
      listops_data
      part=part-$(date +%s)
      resume=()
      [ -f runs/lra_listops/checkpoints/last.ckpt ] && resume=(--ckpt_path runs/lra_listops/checkpoints/last.ckpt)
      mkdir -p "$OUT/listops"
      run listops-fit timeout "${LISTOPS_SECONDS:-480}" python -m hgrn2 fit --config configs/lra/listops.yaml \
        --trainer.enable_progress_bar false --trainer.logger lightning.pytorch.loggers.CSVLogger \
        --trainer.logger.save_dir runs/lra_listops --trainer.logger.name "$part" "${resume[@]}" ${LISTOPS_FLAGS:-}
      cp "runs/lra_listops/$part/version_0/metrics.csv" "$OUT/listops/$part-metrics.csv"
      if [ ! -f runs/lra_listops/checkpoints/last.ckpt ]; then
        echo "=== listops-fit: no checkpoint saved yet (one comes every 250 steps)"; continue
      fi
      cp runs/lra_listops/checkpoints/*.ckpt "$OUT/listops/"
      # the last checkpoint's step, and the best checkpoint its validation-accuracy callback points at
      read -r step best < <(python -c "
import os, torch
c = torch.load('runs/lra_listops/checkpoints/last.ckpt', map_location='cpu', weights_only=False)
best = [s['best_model_path'] for k, s in c['callbacks'].items() if 'val/acc' in k]
print(c['global_step'], os.path.basename(best[0]) if best and best[0] else 'last.ckpt')")
      echo "=== listops-fit: last checkpoint at step $step, best $best"
      if [ "$step" -ge "${LISTOPS_STEPS:-37500}" ]; then
        for checkpoint in runs/lra_listops/checkpoints/last.ckpt "runs/lra_listops/checkpoints/$best"; do
          name=$(basename "$checkpoint" .ckpt)
          run listops-test python -m hgrn2 test --config configs/lra/listops.yaml --ckpt_path "$checkpoint" \
            --trainer.enable_progress_bar false --trainer.logger lightning.pytorch.loggers.CSVLogger \
            --trainer.logger.save_dir runs/lra_listops --trainer.logger.name "test-$name" ${LISTOPS_FLAGS:-}
          latest=$(ls -td "runs/lra_listops/test-$name"/version_* | head -1)
          cp "$latest/metrics.csv" "$OUT/listops/test-$name-metrics.csv"
        done
      fi ;;
    small-state-ab)
      archive=${AB_ARCHIVE:?set AB_ARCHIVE to a git archive of the earlier commit}
      old_tree=$(mktemp -d) && tar -xzf "$archive" -C "$old_tree"
      flags=${SMALL_STATE_FLAGS:---jobs pathfinder,vision}
      out=$(realpath "$OUT")  # the earlier tree's runs write from inside it
      for ((round = 1; round <= ${AB_ROUNDS:-2}; round++)); do
        (cd "$old_tree" && OUT=$out PYTHONPATH="${PYTHONPATH//$PWD/$old_tree}" run "small-state-old-$round" \
          python benchmarks/small_state_throughput.py $flags --out "$out/small-state-ab-old-$round.json")
        run "small-state-new-$round" python benchmarks/small_state_throughput.py $flags \
          --out "$out/small-state-ab-new-$round.json"
      done
      rm -rf "$old_tree" ;;
    compile-parity)
      run compile-parity python experiments/compile_parity.py --out "$RESULTS/compile-parity.json" ${PARITY_FLAGS:-}
      cp "$RESULTS/compile-parity.json" "$OUT/" ;;
    kernel-profile)
      run kernel-profile python experiments/kernel_profile.py --out "$RESULTS/kernel-profile-16k.json"
      run kernel-profile-64k python experiments/kernel_profile.py --tokens 65536 --seq-len 4096 \
        --out "$RESULTS/kernel-profile-64k.json"
      cp "$RESULTS"/kernel-profile-*.json "$OUT/" ;;
    kernel-ncu)  # Nsight Compute on the chunk kernels of one gated forward + backward (B = 4, T = 4096)
      kernels="dqk_bwd|state_walk|chunk_delta|state_scan|output_fwd|dv_bwd|log_forget|gate_grad"
      run kernel-ncu ncu --clock-control none --kernel-name "regex:${NCU_KERNELS:-$kernels}" \
        --launch-count "${NCU_LAUNCHES:-16}" --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis --csv --page details \
        --log-file "$RESULTS/kernel-ncu.csv" python experiments/kernel_versions.py --profile
      cp "$RESULTS/kernel-ncu.csv" "$OUT/" ;;
    small-state-kernels)  # the step-by-step kernels at Pathfinder-32's and HGRN2-Tiny's shapes, each scan of a 2-D
      # layer timed, then Nsight Compute on Pathfinder's four forward and four backward launches
      run small-state-kernels python experiments/small_state_profile.py --out "$RESULTS/small-state-kernels.json"
      run small-state-ncu ncu --clock-control none --kernel-name regex:small_state --launch-count 8 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --csv --page details --log-file "$RESULTS/small-state-ncu.csv" \
        python experiments/small_state_profile.py --ncu-once
      cp "$RESULTS/small-state-kernels.json" "$RESULTS/small-state-ncu.csv" "$OUT/" ;;
    kernel-ncu-source)
      run kernel-ncu-source ncu --clock-control none --kernel-name "regex:${NCU_KERNELS:-dqk_bwd|output_fwd|state_walk}" \
        --launch-count "${NCU_LAUNCHES:-4}" --section SourceCounters --section WarpStateStats --section SpeedOfLight \
        --section Occupancy --section LaunchStats --import-source yes -f -o "$RESULTS/kernel-source" \
        python experiments/kernel_versions.py --profile --profile-op plain --profile-shape 16 4096
      for view in sass cuda; do
        ncu -i "$RESULTS/kernel-source.ncu-rep" --page source --csv --print-source "$view" \
          > "$OUT/kernel-source-$view.csv" 2> "$OUT/kernel-source-$view.err"
      done
      ncu -i "$RESULTS/kernel-source.ncu-rep" --page details --csv > "$OUT/kernel-source-details.csv"
      cp "$RESULTS/kernel-source.ncu-rep" "$OUT/" ;;
    kernel-variants)
      run kernel-variants python experiments/kernel_versions.py --variants --fla ${KERNEL_VARIANTS:+--only "$KERNEL_VARIANTS"} ${KERNEL_SHAPES:+--shapes "$KERNEL_SHAPES"} \
        --out "$RESULTS/kernel-variants.json"
      cp "$RESULTS/kernel-variants.json" "$OUT/" ;;
    listops-launch)  # LISTOPS_LAUNCH="KEY=V1,V2 KEY=V1;...": each group's combinations of experiments/listops_launch.py
      IFS=';' read -ra groups <<<"${LISTOPS_LAUNCH:?set LISTOPS_LAUNCH}"
      for group in "${groups[@]}"; do
        run listops-launch python experiments/listops_launch.py --out "$RESULTS/listops-launch" $group
      done
      cp "$RESULTS"/listops-launch/*.json "$OUT/" ;;
    mqar)
      run mqar python experiments/mqar_sweep.py --out "$RESULTS/mqar" ${MQAR_FLAGS:-}
      cp "$RESULTS"/mqar/* "$OUT/" 2>/dev/null ;;
    *) echo "unknown job $job (benchmarks/gpu_suite.sh runs the benchmarks and the GPU tests)" ;;
  esac
done
