# Sourced by the one-call GPU scripts (gpu_recheck.sh, gpu_levers3.sh, gpu_tp_chain.sh): to the repository root, the
# carried wheels (structlog, pytest-asyncio) into /tmp/site once per machine (a script that sources this and then
# runs another that does too installs them once), and the environment: offline, unbuffered, NVLink multicast off.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PIPESPEC_GPU_ENV:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
fi
export PIPESPEC_GPU_ENV=1 PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 \
       TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
