# Issue 7 on one GPU (~4 min): the engine on the standard workload (decode at B=1 and 64 with
# D = 0, 1, 8, B; prefill of 8192) after the host-step changes, without the peer.
source benchmarks/gpu_session/common.sh
timeout 230 python3 benchmarks/bench_engine.py --out $OUT/engine --skip-peer \
  --batches 1,64 > $OUT/bench_engine.log 2>&1; echo "bench_engine rc=$?"; tail -14 $OUT/bench_engine.log
