# Issue 3 on one GPU (~7 min): bench_sgmv with B rank-major (the engine's pool layout) but for
# the mixed-ranks section (sgmv.sh runs it under both layouts): decode and prefill shapes eager
# and in graphs with the torch baselines, the config sweep, the launches of one decode step and
# the expand variants.
source benchmarks/gpu_session/common.sh
timeout 420 python3 benchmarks/bench_sgmv.py "$OUT" --commit "$LORAPLEX_COMMIT" \
  --only cases sweep decode_step expand_variants > $OUT/bench_sgmv.log 2>&1
echo "bench_sgmv rc=$?"; tail -30 $OUT/bench_sgmv.log
