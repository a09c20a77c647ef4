# Sourced by the GPU scripts: join the SmolLM2 GGUF from the piece kept in /tmp/scratch (an earlier call
# carried .gpu_a, bench/gpu/session.sh PART=stage) and the one carried now (.gpu_b), check its sha256, unpack the task
# data and the exllamav2 wheel (staged from .gpu_t) into the cache, and point the model and cache variables at them.
# Each part has its own marker (smollm2.gguf renamed into place once its sha256 matched, cache/tasks.ok), so a call
# that comes before the task data (a .gpu_b left on the machine by an earlier call) joins the model and stops there
# with a non-zero status; a later call unpacks the tasks.
S=/tmp/scratch
if [ ! -f $S/smollm2.gguf ]; then
  [ -f $S/gguf.part1 ] || { echo "the first GGUF piece is gone (machine not warm): rerun the call that carries .gpu_a"; exit 1; }
  cat $S/gguf.part1 .gpu_b/gguf.part2 > $S/.smollm2.gguf
  echo "$(cat .gpu_b/gguf.sha256)  $S/.smollm2.gguf" | sha256sum -c --quiet - || { rm -f $S/.smollm2.gguf; exit 1; }
  mv $S/.smollm2.gguf $S/smollm2.gguf
fi
if [ ! -f $S/cache/tasks.ok ]; then
  [ -f $S/tasks.tar.xz ] || { echo "the task data is not staged yet: run the stage call that carries .gpu_t"; exit 1; }
  source "$(dirname "${BASH_SOURCE[0]}")/unpack_tasks.sh"
  unpack_tasks || exit 1
fi
export LLM_FP4_SMOLLM2_GGUF=$S/smollm2.gguf LLM_FP4_CACHE=$S/cache
