# Issue 8 on one GPU (~6 min): the N = 8 phase and tenant fairness twice on the same machine,
# with the interpreter's switch interval at 0.5 ms and at Python's 5 ms (--switch-interval-ms):
# the engine thread waits for the interpreter lock behind the HTTP thread's streaming.
source benchmarks/gpu_session/common.sh
for ms in 0.5 5; do
  timeout -k 20 280 python3 benchmarks/bench_serve_scale.py --out $OUT/switch_$ms \
    --commit "$LORAPLEX_COMMIT" --sizes 8 --skip ttft --requests 400 \
    --serve-args "--switch-interval-ms $ms" > $OUT/switch_$ms.log 2>&1
  echo "switch interval $ms ms: rc=$?"
  grep -E '^(steps|waits)' $OUT/switch_$ms.log | tail -4 | cut -c1-400
  tail -4 $OUT/switch_$ms.log
done
