source benchmarks/gpu_session/common.sh
timeout 250 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu tests/platform/test_engine_gpu.py -k "fp32_mixed or graphs_give" tests/platform/test_fp8_engine.py tests/platform/test_cuda_graphs.py tests/kernels/test_sgmv_gpu.py -x > $OUT/pytest-engine-gpu2.log 2>&1
echo "engine gpu tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" $OUT/pytest-engine-gpu2.log | tail -6
timeout 260 python3 benchmarks/bench_engine.py --out $OUT/engine --skip-peer \
  --batches 1,64 > $OUT/bench_engine.log 2>&1; echo "bench_engine rc=$?"; tail -16 $OUT/bench_engine.log
