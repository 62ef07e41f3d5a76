# Issue 7 on one GPU (~4.5 min): the engine on the standard workload (decode at B=1 and 64 with
# D = 0, 1, 8, B; the mixed step of 63 decodes + a 512-token chunk, with its host time; prefill of
# 8192) without the peer. Run after pasting bench_fp8's candidate rows into the TABLE.
source benchmarks/gpu_session/common.sh
timeout 260 python3 benchmarks/bench_engine.py --out $OUT/engine --skip-peer \
  --batches 1,64 > $OUT/bench_engine.log 2>&1; echo "bench_engine rc=$?"; tail -16 $OUT/bench_engine.log
