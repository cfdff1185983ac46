# Set-up shared by benchmarks/gpu_suite.sh and experiments/gpu_suite.sh (sourced by them, not run alone):
# the output folders, wheels from .wheels/ when present, Triton's cache, and run(), which times one job.
# Expects RESULTS (where the scripts write) to be set; OUT (where copies and logs go) defaults to RESULTS.
OUT=${OUT:-$RESULTS}
mkdir -p "$OUT" "$RESULTS"
# A machine without a package index gets the packages it lacks (jsonargparse, datasets, fla, ...) as wheels in
# .wheels/; they are installed once per machine into /tmp/site, so that two suites can run side by side.
if compgen -G ".wheels/*.whl" >/dev/null; then
  if [ ! -e /tmp/site/.installed ]; then
    pip install -q --no-deps --target /tmp/site .wheels/*.whl 2>&1 | tail -1 && touch /tmp/site/.installed
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Triton's cache, with autotuning results, is written to $OUT/triton-cache.tar.gz at exit; put back as
# .triton-cache.tar.gz before the next suite it spares fla minutes of autotuning. Scripts record the cache's state
# in their JSON, since first-call times include compilation only when it was empty.
# Inductor's cache (the graphs torch.compile built) likewise as $OUT/inductor-cache.tar.gz, put back as
# .inductor-cache.tar.gz: a fit with compiled blocks resumed in the next suite then skips most of its compilation.
# Files come back from a GPU machine only up to 16 MiB each: a larger Inductor cache is not kept.
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=$PWD/.triton-cache TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-cache
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
[ -f .triton-cache.tar.gz ] && tar -xzf .triton-cache.tar.gz -C "$TRITON_CACHE_DIR"
[ -f .inductor-cache.tar.gz ] && tar -xzf .inductor-cache.tar.gz -C "$TORCHINDUCTOR_CACHE_DIR"
save_cache() {
  tar -czf "$OUT/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
  if [ "$(stat -c %s "$OUT/triton-cache.tar.gz")" -gt $((16 * 1024 * 1024)) ]; then
    # too large to keep whole: keep the autotuning results alone, so that the next suite compiles only the chosen configs
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/triton-cache.tar.gz" --null -T -)
    echo "Triton cache over 16 MiB: only its autotuning results kept"
  fi
  if [ -n "$(ls -A "$TORCHINDUCTOR_CACHE_DIR")" ]; then
    tar -czf "$OUT/inductor-cache.tar.gz" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null
    if [ "$(stat -c %s "$OUT/inductor-cache.tar.gz")" -gt $((16 * 1024 * 1024)) ]; then
      rm -f "$OUT/inductor-cache.tar.gz"
      echo "Inductor cache over 16 MiB: not kept"
    fi
  fi
}
trap save_cache EXIT
trap "exit 143" TERM INT

run() {  # run NAME COMMAND...: time a job, keep its log in $OUT/suite.log, never stop the suite
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/suite.log" | tail -25
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}
