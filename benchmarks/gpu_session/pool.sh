# Issue 8 on one GPU (~3 min): bench_pool on the 8B shapes, the pinned and the staged (pool's
# own, since fc3bc3f) host→GPU copy against the pinned-copy floor, the slot write, acquires from
# the host tier and from disk. Then the slot write's two halves inside a served engine: serve_loads.sh.
source benchmarks/gpu_session/common.sh
timeout 240 python3 benchmarks/bench_pool.py $OUT/pool --commit "$LORAPLEX_COMMIT" \
  > $OUT/bench_pool.log 2>&1
echo "bench_pool rc=$?"; tail -14 $OUT/bench_pool.log
