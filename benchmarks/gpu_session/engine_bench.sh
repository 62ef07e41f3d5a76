# Issue 7 on one GPU (~4.5 min): bench_engine on the standard workload with mixed graphs on (the
# mixed step eager and replayed), decode at B=1 and 64 with D = 0, 1, 8, B, prefill of 8192.
source benchmarks/gpu_session/common.sh
timeout 280 python3 benchmarks/bench_engine.py --out $OUT/engine --skip-peer \
  --mixed-graph-max-tokens 1024 --batches 1,64 > $OUT/bench_engine.log 2>&1
echo "bench_engine rc=$?"; tail -17 $OUT/bench_engine.log
