# Issue 8 fairness on one GPU (~6 min; 120 steady-tenant requests a phase since 09e4c52): the N = 8 phase (for the base rate) and tenant fairness
# only, with where the steady tenant's requests waited (admission, setup, engine queue, prefill,
# delivery) and, since 78dbbcd, the event loop's lag; then the adapter staging GPU tests.
source benchmarks/gpu_session/common.sh
timeout -k 30 400 python3 benchmarks/bench_serve_scale.py --out $OUT/serve_scale \
  --commit "$LORAPLEX_COMMIT" --sizes 8 --skip ttft --requests 400 --fair-requests 120 \
  > $OUT/serve_scale.log 2>&1
echo "bench_serve_scale rc=$?"; grep -E '^(equal|flood|waits|steps)' $OUT/serve_scale.log | tail -8
tail -8 $OUT/serve_scale.log
timeout 200 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/platform/test_stage_adapter.py > $OUT/pytest-stage.log 2>&1
echo "stage gpu tests rc=$?"; tail -3 $OUT/pytest-stage.log
