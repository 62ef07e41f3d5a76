# Issues 7 and 10 on one GPU (~8 min): bench_fp8 over the Llama-3.1-70B shard shapes of 2 and 4
# GPUs (each rank's linears), for the TABLE rows tensor parallelism runs.
source benchmarks/gpu_session/common.sh
timeout 500 python3 benchmarks/bench_fp8.py --out $OUT/fp8-70b --quick \
  --commit "$LORAPLEX_COMMIT" --shapes 70b-tp2,70b-tp4 > $OUT/bench_fp8_70b.log 2>&1
echo "bench_fp8 rc=$?"; tail -40 $OUT/bench_fp8_70b.log
