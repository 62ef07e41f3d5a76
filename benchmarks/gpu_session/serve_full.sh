# Issue 8 on one GPU (~5 min on an H100 at 400 requests a phase, 7b6203a; 120 steady-tenant
# requests a fairness phase since 21edf65, for a steadier p99): the scale phases at
# N = 8, 128 and 1024, the eviction cliff and tenant fairness (their adapters warmed first), each
# phase with its steps' host ms and GPU wait.
source benchmarks/gpu_session/common.sh
timeout -k 30 560 python3 benchmarks/bench_serve_scale.py --out $OUT/serve_scale \
  --commit "$LORAPLEX_COMMIT" --sizes 8,128,1024 --requests 400 --ttft-requests 120 --fair-requests 120 \
  > $OUT/serve_scale.log 2>&1
echo "bench_serve_scale rc=$?"; tail -30 $OUT/serve_scale.log
