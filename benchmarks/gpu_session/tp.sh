# Issue 10 on a 2- or 4-GPU host (~8 min on 4): TP GPU tests (teardown included), 8B fp32
# parity at every size against 1, 70B FP8 decode at 2 (and 4) GPUs. Figures go to $OUT.
source benchmarks/gpu_session/common.sh
if [ "$NG" -ge 4 ]; then SIZES="1 2 4"; BIG="2 4"; else SIZES="1 2"; BIG="2"; fi
timeout 240 python3 -m pytest -v --tb=short -p no:cacheprovider \
  tests/platform/test_tensor_parallel_gpu.py > $OUT/pytest-tp-gpu.log 2>&1
echo "pytest rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $OUT/pytest-tp-gpu.log | tail -8
for n in $SIZES; do
  timeout 100 python3 benchmarks/bench_tensor_parallel.py run --shapes 8b --dtype float32 \
    --skip-decode --tp $n --out $OUT/tp8b-fp32 --parity-dir /tmp/par32 > $OUT/tp8b-fp32-$n.log 2>&1
  echo "8b fp32 tp$n rc=$?"
done
python3 benchmarks/bench_tensor_parallel.py report --out $OUT/tp8b-fp32 --parity-dir /tmp/par32 | tail -3
for n in $BIG; do
  timeout 150 python3 benchmarks/bench_tensor_parallel.py run --shapes 70b --quantization fp8 \
    --tp $n --out $OUT/tp70b > $OUT/tp70b-$n.log 2>&1
  echo "70b fp8 tp$n rc=$?"; grep -E "^tp=" $OUT/tp70b-$n.log
done
python3 benchmarks/bench_tensor_parallel.py report --out $OUT/tp70b
