"""GPU without the CUDA ``sgl-kernel`` wheel: stock SGLang on torch + Triton + JIT kernels.

For the one-shot GPU kit (``benchmarks/gpu/``, ``docs/gpu.md``): the GPU machine we get
has torch, Triton and ``nvcc`` but no SGLang wheels beyond what we carry, and the CUDA
``sglang-kernel`` wheel is too large to carry (and built for another torch). SGLang
0.5.23 on CUDA imports ``sgl_kernel`` names at module import time, yet on the path the
kit uses it calls them only in a few places. :func:`activate` (explicit, in the process
that builds the engine, before SGLang is imported; spawned scheduler processes inherit it
through the environment) makes that path work without the wheel:

- a ``sgl_kernel`` stand-in first on ``sys.path`` / ``PYTHONPATH``: every name imports,
  unknown names raise NotImplementedError naming themselves when called (never silently
  wrong); ``sgl_kernel.utils.is_arch_support_pdl`` answers as the real one does;
- ``SGLANG_FORCE_FUSED_OP_BACKEND=torch``: SGLang's fused ops (RMSNorm, SiLU-and-mul,
  rotary embedding, ...) take their own pure-torch ``forward_native`` (SGLang's global
  switch, meant for exactly this kind of bisecting);
- ``SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1`` (the engine otherwise insists on the wheel)
  and ``SGLANG_IS_FLASHINFER_AVAILABLE=false`` (no FlashInfer either);
- ``SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python``: SGLang's radix cache in Python, not
  its bundled Rust tree core, which is built with SGLang's pinned torch (2.14): under the
  image's torch 2.11 it misreads tensor dtypes at the first prefill ("insert value must be
  an int64 tensor, got QInt8"; reproduced on the CPU with torch 2.11 and the carried
  wheels, and gone with this switch);
- engine settings :data:`ENGINE_KWARGS`: Triton attention (supports TARGET_VERIFY with
  the tree mask), the pytorch sampling backend.

SGLang's speculative ops on CUDA (``verify_tree_greedy``, ``reconstruct_indices...``,
``store_cache``, NGRAM's ``tree_speculative_sampling_target_only``) are not in
``sgl_kernel``: SGLang JIT-compiles them from ``sglang/kernels/jit/csrc`` with ``nvcc``
through ``apache-tvm-ffi`` (carried as a wheel). The cache-location and mask ops are
Triton. Nothing here edits or patches SGLang; on a machine where the real ``sgl_kernel``
is importable :func:`activate` does nothing but return False.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

STANDINS = str(Path(__file__).resolve().parent / "standins")

ENV = {
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
    "SGLANG_IS_FLASHINFER_AVAILABLE": "false",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
}

ENGINE_KWARGS = dict(
    attention_backend="triton",
    sampling_backend="pytorch",
)


def real_sgl_kernel_installed() -> bool:
    """Whether an ``sgl_kernel`` other than our stand-in is importable."""
    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or spec.origin is None:
        return False
    return not str(spec.origin).startswith(STANDINS)


def activate() -> bool:
    """Turn the no-kernel GPU mode on in this process and the processes it spawns.

    Returns True when activated, False when the real ``sgl_kernel`` is installed (then
    SGLang runs as shipped). Raises RuntimeError without a CUDA GPU: the CPU has its own
    development mode (``DAS_SGLANG_CPU=1``).
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("nokernel mode needs a CUDA GPU; on a CPU use DAS_SGLANG_CPU=1")
    if "sglang" in sys.modules and STANDINS not in sys.path:
        raise RuntimeError("nokernel.activate() must run before sglang is imported")
    if real_sgl_kernel_installed():
        return False
    os.environ.update(ENV)
    if STANDINS not in sys.path:
        sys.path.insert(0, STANDINS)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if STANDINS not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([STANDINS, *filter(None, paths)])
    return True
