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
