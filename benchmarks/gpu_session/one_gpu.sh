# Issues 3 and 7 on one GPU (~8.5 min): the engine's GPU tests (the host-step changes of
# 547a5e7/bb37698/76ef2ec have not run on a GPU yet), the build test not re-run since its fix,
# the multi-block SGMV expand's GPU tests and its benchmark against the per-block kernel.
source benchmarks/gpu_session/common.sh
timeout 200 python3 -m pytest -v --tb=short -p no:cacheprovider -m gpu tests/test_build.py \
  tests/platform/test_engine_gpu.py tests/platform/test_fp8_engine.py \
  tests/platform/test_cuda_graphs.py > $OUT/pytest-engine-gpu.log 2>&1
echo "engine gpu tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" $OUT/pytest-engine-gpu.log | tail -6
timeout 100 python3 -m pytest -q --tb=line -p no:cacheprovider -m gpu \
  tests/kernels/test_sgmv_expand_blocks_gpu.py > $OUT/pytest-expand-blocks.log 2>&1
echo "expand_blocks gpu tests rc=$?"; tail -2 $OUT/pytest-expand-blocks.log
timeout 200 python3 benchmarks/bench_sgmv.py "$OUT" --commit "$LORAPLEX_COMMIT" \
  --only expand_variants > $OUT/bench_sgmv_variants.log 2>&1; echo "bench_sgmv rc=$?"
tail -20 $OUT/bench_sgmv_variants.log
