# Issue 8 on one GPU (~9.5 min): the scale and eviction-cliff phases with where the engine's time
# went in each (steps by kind, dispatch share), saved after every phase; then the serving layer
# around a faked step on this host's CPUs. 256 streams (load_streams.py, ~6 min at the 2026-11-27
# serving speed) and the 30-min soak need calls of their own.
source benchmarks/gpu_session/common.sh
timeout -k 30 420 python3 benchmarks/bench_serve_scale.py --out $OUT/serve_scale \
  --commit "$LORAPLEX_COMMIT" --sizes 8,128 --requests 200 --ttft-requests 120 \
  --skip fairness > $OUT/serve_scale.log 2>&1
echo "bench_serve_scale rc=$?"; tail -22 $OUT/serve_scale.log
timeout -k 10 120 python3 benchmarks/bench_api_overhead.py --out $OUT/api_overhead \
  --streams 64,128,256 > $OUT/api_overhead.log 2>&1
echo "bench_api_overhead rc=$?"; tail -6 $OUT/api_overhead.log
