# Sourced by the GPU scripts: join the SmolLM2 GGUF from the piece kept in /tmp/scratch (an earlier call
# carried .gpu_a, bench/gpu/session.sh PART=stage) and the one carried now (.gpu_b), check its sha256, unpack the task
# data and the exllamav2 wheel (staged from .gpu_t) into the cache, and point the model and cache variables at them.
S=/tmp/scratch
[ -f $S/gguf.part1 ] || { echo "the first GGUF piece is gone (machine not warm): rerun the call that carries .gpu_a"; exit 1; }
if [ ! -f $S/smollm2.gguf ]; then
  cat $S/gguf.part1 .gpu_b/gguf.part2 > $S/smollm2.gguf
  echo "$(cat .gpu_b/gguf.sha256)  $S/smollm2.gguf" | sha256sum -c -
  mkdir -p $S/cache && tar -C $S/cache -xJf $S/tasks.tar.xz
  mkdir -p $S/cache/wheels && cp $S/exllamav2-*.whl $S/cache/wheels/
fi
export LLM_FP4_SMOLLM2_GGUF=$S/smollm2.gguf LLM_FP4_CACHE=$S/cache
