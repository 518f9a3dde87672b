"""``sgl_kernel.utils`` stand-in: the one helper SGLang's Triton attention calls on CUDA."""

from das_sglang.sglang.cpu.standins._standin import module_getattr


def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch: Hopper (sm_90) and newer, as the real helper says."""
    from sglang.kernels.jit.utils import is_arch_support_pdl as jit_answer

    return jit_answer()


__getattr__ = module_getattr(__name__)
