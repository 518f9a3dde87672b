"""GPU stand-in for ``sgl_kernel`` when the CUDA wheel is absent (never on the CPU).

Every name imports; calling an unknown one raises NotImplementedError naming it. See
``das_sglang.sglang.nokernel`` for why this is enough on the kit's path.
"""

from das_sglang.sglang.cpu.standins._standin import install_submodule_finder, module_getattr

__version__ = "0.0.0+das-sglang-nokernel-standin"
tree_speculative_sampling_target_only = None  # SGLang then takes its JIT / Triton paths
install_submodule_finder(__name__)
__getattr__ = module_getattr(__name__)
