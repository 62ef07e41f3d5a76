# Issue 10 on a 4-GPU host (~5.5 min): 8B shapes in fp32, sizes 1, 2 and 4 against 1 (logits and
# greedy tokens). Size 2 against 1 was shown on 2026-11-27 (H200, run 2).
source benchmarks/gpu_session/common.sh
if [ "$NG" -ge 4 ]; then SIZES="1 2 4"; else SIZES="1 2"; fi
for n in $SIZES; do
  timeout 100 python3 benchmarks/bench_tensor_parallel.py run --shapes 8b --dtype float32 \
    --skip-decode --tp $n --out $OUT/tp8b-fp32 --parity-dir /tmp/par32 > $OUT/tp8b-fp32-$n.log 2>&1
  echo "8b fp32 tp$n rc=$?"
done
python3 benchmarks/bench_tensor_parallel.py report --out $OUT/tp8b-fp32 --parity-dir /tmp/par32 | tail -3
