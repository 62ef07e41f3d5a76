# Issue 8 on one GPU (~10 min): 256 concurrent streams, then the scale / eviction-cliff /
# fairness benchmark. The soak (benchmarks/soak.py --minutes 30) needs a session of its own.
source benchmarks/gpu_session/common.sh
timeout -k 30 300 python3 benchmarks/load_streams.py --out $OUT/load_streams > $OUT/load_streams.log 2>&1
echo "load_streams rc=$?"; tail -15 $OUT/load_streams.log
timeout -k 30 280 python3 benchmarks/bench_serve_scale.py --out $OUT/serve_scale \
  --commit "$LORAPLEX_COMMIT" --sizes 8,128 > $OUT/serve_scale.log 2>&1
echo "bench_serve_scale rc=$?"; tail -15 $OUT/serve_scale.log
