import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# benchmarks/gpu_check.py --gpus N: pytest-xdist worker gwK sees only GPU K % N (set before JAX starts a
# backend), so the suite on N GPUs takes about 1/N the time and every test still runs on one GPU.
_gpus, _worker = int(os.environ.get("FP4JAX_TEST_GPUS") or 0), os.environ.get("PYTEST_XDIST_WORKER", "")
if _gpus > 1 and _worker.startswith("gw"):
  os.environ["CUDA_VISIBLE_DEVICES"] = str(int(_worker[2:]) % _gpus)
# On the GPU machine (JAX_PLATFORMS=cuda) also start the CPU platform: the GPU stays the default
# backend (first in the list) and tests/test_cross_platform.py compares it with jax.devices("cpu").
if os.environ["JAX_PLATFORMS"] in ("cuda", "gpu", "rocm"):
  os.environ["JAX_PLATFORMS"] += ",cpu"

from hypothesis import settings  # noqa: E402

# CI machines are small and shared: no per-example deadline, a moderate budget.
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Kernel fuzzing (tests/test_kernels_fuzz.py): a bounded run in CI, a long one on a GPU
# (FP4JAX_FUZZ=gpu, or a GPU present: real kernels are fast, interpret mode is not).
settings.register_profile("fuzz", deadline=None, max_examples=12, derandomize=bool(os.environ.get("CI")))
settings.register_profile("fuzz-gpu", deadline=None, max_examples=40)
