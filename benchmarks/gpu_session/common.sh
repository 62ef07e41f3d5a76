# Sourced by every call script: wheels the GPU host lacks, paths, and what the machine is.
# Usage from the repository root on the device: LORAPLEX_COMMIT=<sha> bash benchmarks/gpu_session/<call>.sh
# (carry .whl, built by ../shared/device/wheels.sh pydantic-settings python-dotenv uvloop httptools).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "WHEEL INSTALL FAILED"
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests:$PYTHONPATH
export TOKENIZERS_PARALLELISM=false
python3 -c "import uvloop, httptools" 2>/dev/null || echo "NO uvloop/httptools: rebuild .whl (see above)"
: "${LORAPLEX_COMMIT:?set LORAPLEX_COMMIT to the commit sent (the host .git is stale)}"
: "${OUT:?the device tool sets OUT}"
echo "commit $LORAPLEX_COMMIT; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
nvidia-smi -L
NG=$(nvidia-smi -L | wc -l)
