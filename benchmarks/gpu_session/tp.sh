# Issue 10 on a 2- or 4-GPU host (~9 min on 4): the TP GPU tests (teardown included; on 2 GPUs
# on 2026-11-27 the fp32 tests took ~2 min and the FP8 shard test did not finish in the 2 min
# left), then 70B FP8 decode at 2 (and 4) GPUs. 8B fp32 parity at every size: tp_parity.sh.
source benchmarks/gpu_session/common.sh
if [ "$NG" -ge 4 ]; then BIG="2 4"; else BIG="2"; fi
timeout 270 python3 -m pytest -v --tb=short -p no:cacheprovider \
  tests/platform/test_tensor_parallel_gpu.py > $OUT/pytest-tp-gpu.log 2>&1
echo "pytest rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $OUT/pytest-tp-gpu.log | tail -8
for n in $BIG; do
  timeout 150 python3 benchmarks/bench_tensor_parallel.py run --shapes 70b --quantization fp8 \
    --tp $n --out $OUT/tp70b > $OUT/tp70b-$n.log 2>&1
  echo "70b fp8 tp$n rc=$?"; grep -E "^tp=|did not finish" $OUT/tp70b-$n.log
done
python3 benchmarks/bench_tensor_parallel.py report --out $OUT/tp70b
