# Issues 3, 7, 8 on one GPU (~9 min): the build test not re-run since its fix, the SGMV
# expand variants, the engine on the standard workload, and 256 concurrent streams.
source benchmarks/gpu_session/common.sh
timeout 90 python3 -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/test_build.py \
  > $OUT/pytest-build-gpu.log 2>&1; echo "build gpu test rc=$?"
timeout 120 python3 -m pytest -q --tb=line -p no:cacheprovider -m gpu \
  tests/kernels/test_sgmv_expand_blocks_gpu.py > $OUT/pytest-expand-blocks.log 2>&1
echo "expand_blocks gpu tests rc=$?"; tail -2 $OUT/pytest-expand-blocks.log
timeout 240 python3 benchmarks/bench_sgmv.py "$OUT" --commit "$LORAPLEX_COMMIT" \
  --only expand_variants > $OUT/bench_sgmv_variants.log 2>&1; echo "bench_sgmv rc=$?"
tail -20 $OUT/bench_sgmv_variants.log
timeout 200 python3 benchmarks/bench_engine.py --out $OUT/engine --skip-peer \
  --batches 1,64 > $OUT/bench_engine.log 2>&1; echo "bench_engine rc=$?"; tail -12 $OUT/bench_engine.log
