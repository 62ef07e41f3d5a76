# Issue 3 on one GPU (~9 min): the SGMV float64 GPU tests with the multi-block decode expand now
# the default, then the whole bench_sgmv (decode and prefill shapes, graphs, mixed ranks,
# launches per decode step) against issue 3's targets.
source benchmarks/gpu_session/common.sh
timeout 150 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/kernels/test_sgmv_gpu.py > $OUT/pytest-sgmv.log 2>&1
echo "sgmv gpu tests rc=$?"; tail -3 $OUT/pytest-sgmv.log
timeout 390 python3 benchmarks/bench_sgmv.py "$OUT" --commit "$LORAPLEX_COMMIT" \
  > $OUT/bench_sgmv.log 2>&1; echo "bench_sgmv rc=$?"; tail -30 $OUT/bench_sgmv.log
