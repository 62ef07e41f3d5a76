# Issue 7 on one GPU (~8.5 min): the graphs of steps with prompt chunks (mixed_graphs.py, off by
# default) against eager on the GPU, then the engine on the standard workload: decode at B=1 and
# 64 with D = 0, 1, 8, B; the mixed step of 63 decodes + a 512-token chunk, eager and replayed,
# with its host time; prefill of 8192; no peer. Also the FP8 engine and CUDA-graph GPU tests
# that the 8b8e0d6 run cut off. Run after pasting bench_fp8's TABLE rows.
source benchmarks/gpu_session/common.sh
timeout 100 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/platform/test_engine_gpu.py -k graphs_give > $OUT/pytest-mixed-graphs.log 2>&1
echo "graph tests rc=$?"; tail -3 $OUT/pytest-mixed-graphs.log
timeout 120 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/platform/test_fp8_engine.py tests/platform/test_cuda_graphs.py > $OUT/pytest-engine-rest.log 2>&1
echo "fp8 engine + graphs gpu tests rc=$?"; tail -3 $OUT/pytest-engine-rest.log
timeout 280 python3 benchmarks/bench_engine.py --out $OUT/engine --skip-peer \
  --mixed-graph-max-tokens 1024 --batches 1,64 > $OUT/bench_engine.log 2>&1
echo "bench_engine rc=$?"; tail -17 $OUT/bench_engine.log
