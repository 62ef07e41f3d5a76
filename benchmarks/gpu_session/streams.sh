# Issue 8 on one GPU (~6 min): 256 concurrent streams, zero errors. 4 tenants x 16 adapters fit
# the 64 slots (the 2026-11-27 run with 4 x 64 adapters through 64 slots did not finish its
# 1,024 requests in 300 s: slots, not streams, bounded it), 2 requests a stream.
source benchmarks/gpu_session/common.sh
timeout -k 30 420 python3 benchmarks/load_streams.py --out $OUT/load_streams \
  --adapters 16 --per-stream 2 > $OUT/load_streams.log 2>&1
echo "load_streams rc=$?"; tail -15 $OUT/load_streams.log
