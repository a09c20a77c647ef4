# Sourced by bench/gpu/queue.sh and bench/gpu/join_smollm2.sh: unpack_tasks unpacks the tasks' data and the exllamav2
# wheel (staged from .gpu_t into /tmp/scratch) into the cache the rows and benches read, once: under one lock (Qwen's
# and Gemma3's rows and SmolLM2's join may call it side by side), with cache/tasks.ok marking that it finished.
# Non-zero status when the unpacking failed.
unpack_tasks() {
  local S=/tmp/scratch
  (
    flock 9
    [ -f $S/cache/tasks.ok ] || { mkdir -p $S/cache/wheels && tar -C $S/cache -xJf $S/tasks.tar.xz \
      && cp $S/exllamav2-*.whl $S/cache/wheels/ && touch $S/cache/tasks.ok; }
  ) 9> $S/cache.lock
}
