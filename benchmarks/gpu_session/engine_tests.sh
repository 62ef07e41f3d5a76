# Issues 7 and 8 on one GPU (~6 min): the engine's GPU tests since mixed graphs became the default
# (fc76c6c: PEFT parity with graphs now replays prompt-chunk steps too) and the two-half slot
# write on CUDA (5aeb75c: A and B on a side stream beside graph replays).
source benchmarks/gpu_session/common.sh
timeout 420 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/platform/test_engine_gpu.py tests/platform/test_stage_adapter.py \
  > $OUT/pytest-engine-gpu.log 2>&1
echo "engine gpu tests rc=$?"; tail -4 $OUT/pytest-engine-gpu.log
