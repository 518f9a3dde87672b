"""GPU stand-in for ``cutlass`` (NVIDIA's CuTe DSL, ``nvidia-cutlass-dsl``) when it is absent.

SGLang 0.5.23 builds every Llama / Qwen2 MLP with a ``DualGemm`` whose mode check imports
``sglang.kernels.ops.gemm.cutedsl_dual_gemm`` on CUDA, and that module imports ``cutlass``
at its top. The kernel itself runs only on SM100 (Blackwell): on Hopper
``can_use_dual_gemm`` answers False before anything of ``cutlass`` is used, so the
import is all SGLang needs there. Every ``cutlass.*`` module and name imports; the
CuTe decorators (``@cute.experimental.jit`` / ``.kernel``) applied at import time give
functions that raise NotImplementedError naming themselves when called; any other use
raises NotImplementedError. Found by the first GPU kit run (2026-12-04): every engine
stopped at ``import cutlass``.
"""

from das_sglang.sglang.cpu.standins._standin import install_submodule_finder, module_getattr

__version__ = "0.0.0+das-sglang-nokernel-standin"
install_submodule_finder(__name__, decorators=True)
__getattr__ = module_getattr(__name__, decorators=True)
