"""GPU no-kernel mode (das_sglang.sglang.nokernel), the parts that can be checked on a CPU:
it refuses without CUDA, and its ``sgl_kernel`` stand-in imports every name and raises
NotImplementedError naming the op when one is called (never silently wrong). Run in a
subprocess: the stand-in must not replace the CPU mode's ``sgl_kernel`` in this process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = r"""
import sys
from das_sglang.sglang import nokernel
try:
    nokernel.activate()
except RuntimeError as e:
    print("refused:", e)
sys.path.insert(0, nokernel.STANDINS)
import sgl_kernel
from sgl_kernel import rmsnorm, fused_add_rmsnorm
from sgl_kernel.utils import is_arch_support_pdl
import sgl_kernel.speculative
assert sgl_kernel.__version__.endswith("nokernel-standin")
assert sgl_kernel.tree_speculative_sampling_target_only is None
assert callable(is_arch_support_pdl)
try:
    rmsnorm(1, 2)
except NotImplementedError as e:
    print("raised:", e)
"""


def test_refuses_without_cuda_and_standin_raises_by_name():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    assert "refused: nokernel mode needs a CUDA GPU" in out.stdout
    assert "raised: sgl_kernel.rmsnorm is not available" in out.stdout


CUTLASS = r"""
import sys
from das_sglang.sglang import nokernel
sys.path.insert(0, nokernel.STANDINS)
import cutlass, cutlass.cute as cute
from cutlass.cute.runtime import from_dlpack
assert cutlass.__version__.endswith("nokernel-standin")

@cute.experimental.jit
def launch(x):
    return x

try:
    launch(1)
except NotImplementedError as e:
    print("raised:", e)
try:
    from_dlpack(1)
except NotImplementedError as e:
    print("raised:", e)
# SGLang builds every Llama / Qwen2 MLP with a DualGemm whose mode check imports this
# module on CUDA; on anything but SM100 it must answer False without touching cutlass.
import sglang.kernels.ops.gemm.cutedsl_dual_gemm as m
print("dual gemm:", m.can_use_dual_gemm(16, 1536, 4096, m.DualGemmQuantMode.UNQUANT))
"""


def test_cutlass_standin_imports_sglang_dual_gemm_and_raises_by_name():
    pytest.importorskip("cuda.bindings.driver", reason="SGLang's dual-GEMM module imports cuda-bindings")
    out = subprocess.run([sys.executable, "-c", CUTLASS], capture_output=True, text=True,
                         timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "raised: launch (decorated by cutlass.cute.experimental.jit) is not available" in out.stdout
    assert "raised: cutlass.cute.runtime.from_dlpack is not available" in out.stdout
    assert "dual gemm: False" in out.stdout


def test_env_switches_are_values_the_installed_sglang_accepts():
    """The first GPU run stopped at SGLANG_FORCE_FUSED_OP_BACKEND=native ('native' is not
    a KernelBackend of SGLang 0.5.23): every value we set must parse in SGLang itself."""
    from das_sglang.sglang import nokernel

    spec = pytest.importorskip("sglang.kernels.spec")
    assert spec.KernelBackend(nokernel.ENV["SGLANG_FORCE_FUSED_OP_BACKEND"]) == spec.KernelBackend.TORCH
    registry = pytest.importorskip("sglang.srt.mem_cache.unified_cache.tree_core_registry")
    assert nokernel.ENV["SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"] in registry.registered_tree_core_backends()
    from sglang.srt.environ import envs

    for name in nokernel.ENV:
        assert hasattr(envs, name), f"{name} is not an SGLang environment switch"
