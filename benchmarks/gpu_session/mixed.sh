# Issue 7/8 on one GPU (~9 min): where an eager step with a prompt chunk spends its host time
# (profile_mixed.py: cProfile + torch.profiler; the ba4ecf8 run saw 103.8 ms with 102.7 ms of it
# host, against 10.4 ms replayed), the mixed-graph GPU test (its engine builds take >100 s), then
# bench_engine with the splitk rows of the FP8 table and mixed graphs on.
source benchmarks/gpu_session/common.sh
cd benchmarks && timeout 200 python3 profile_mixed.py --out $OUT/profile > $OUT/profile_mixed.log 2>&1
echo "profile_mixed rc=$?"; head -45 $OUT/profile_mixed.log; tail -24 $OUT/profile_mixed.log; cd ..
timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu \
  tests/platform/test_engine_gpu.py -k graphs_give > $OUT/pytest-mixed-graphs.log 2>&1
echo "graph tests rc=$?"; tail -3 $OUT/pytest-mixed-graphs.log
