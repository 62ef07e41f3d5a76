# Issues 3 and 7 on one GPU (~9 min): the split-K FP8 kernels' GPU tests, then bench_fp8 over
# the 8B shapes, every candidate timed replayed in CUDA graphs; it writes
# fp8_dispatch_candidate.py, the rows to paste into kernels/fp8/dispatch.py's TABLE (then run
# engine.sh to check bucket 64 inside the engine). The 70B shard shapes: fp8_70b.sh.
source benchmarks/gpu_session/common.sh
timeout 120 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/kernels/test_fp8_splitk_gpu.py > $OUT/pytest-fp8-splitk.log 2>&1
echo "splitk gpu tests rc=$?"; tail -3 $OUT/pytest-fp8-splitk.log
timeout 420 python3 benchmarks/bench_fp8.py --out $OUT/fp8 --quick --commit "$LORAPLEX_COMMIT" \
  --shapes 8b > $OUT/bench_fp8.log 2>&1; echo "bench_fp8 rc=$?"
tail -40 $OUT/bench_fp8.log
