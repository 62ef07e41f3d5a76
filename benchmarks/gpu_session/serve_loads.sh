# Issue 8 on one GPU (~4 min): the N=128 scale phase and the eviction-cliff phases alone, to
# compare slot-write changes against a full serve.sh run of an earlier commit on the same card.
source benchmarks/gpu_session/common.sh
timeout -k 20 250 python3 benchmarks/bench_serve_scale.py --out $OUT/serve_scale \
  --commit "$LORAPLEX_COMMIT" --sizes 128 --requests 200 --ttft-requests 120 \
  --skip fairness > $OUT/serve_scale.log 2>&1
echo "bench_serve_scale rc=$?"; tail -16 $OUT/serve_scale.log
