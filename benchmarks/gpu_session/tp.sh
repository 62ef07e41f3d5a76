# Issue 10 on a 2- or 4-GPU host (~9.5 min on 4): 70B FP8 decode at 2 (and 4) GPUs. On
# 2026-11-27 (4xH200, fc76c6c) the engine came up in 80-90 s and captured its graphs in ~45 s,
# and 150 s per size was not enough: each size now gets 270 s. The TP GPU tests: tp_tests.sh.
source benchmarks/gpu_session/common.sh
if [ "$NG" -ge 4 ]; then BIG="2 4"; else BIG="2"; fi
for n in $BIG; do
  timeout -k 10 270 python3 benchmarks/bench_tensor_parallel.py run --shapes 70b --quantization fp8 \
    --tp $n --out $OUT/tp70b > $OUT/tp70b-$n.log 2>&1
  echo "70b fp8 tp$n rc=$?"; grep -E "^tp=|did not finish" $OUT/tp70b-$n.log
done
python3 benchmarks/bench_tensor_parallel.py report --out $OUT/tp70b
