# Issue 3 on one GPU (~3 min on an H100 at fbe19b0): the SGMV float64 GPU tests over both B
# layouts (158 passed at fbe19b0; not re-run since 9eca0a8's prefill rank step of 32), then
# bench_sgmv's mixed-ranks section under both layouts side by side (mix and uniform ideal runs,
# eager and graph).
# The rest of bench_sgmv (decode/prefill shapes, launches per step): sgmv_bench.sh.
source benchmarks/gpu_session/common.sh
timeout 240 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/kernels/test_sgmv_gpu.py tests/kernels/test_sgmv_expand_blocks_gpu.py \
  > $OUT/pytest-sgmv.log 2>&1
echo "sgmv gpu tests rc=$?"; tail -3 $OUT/pytest-sgmv.log
timeout 240 python3 benchmarks/bench_sgmv.py "$OUT" --commit "$LORAPLEX_COMMIT" \
  --only mixed_ranks --b-layout both > $OUT/bench_sgmv_mixed.log 2>&1
echo "bench_sgmv mixed rc=$?"; tail -5 $OUT/bench_sgmv_mixed.log
for f in "$OUT"/bench_sgmv-*.json; do python3 benchmarks/sgmv_report.py "$f" | tail -12; done
