"""CPU development mode stand-in for ``sgl_kernel`` (never used on GPU).

The few CPU ops SGLang's speculative path calls are implemented in torch by
``das_sglang.sglang.cpu.ops``; every other name imports fine and raises
NotImplementedError when called.
"""

# The stand-ins directory is on sys.path (that is how this package was found).
from _standin import install_submodule_finder, module_getattr

from das_sglang.sglang.cpu.ops import (  # noqa: E402,F401
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    verify_tree_greedy_cpu,
)

__version__ = "0.0.0+das-sglang-cpu-standin"
tree_speculative_sampling_target_only = None
install_submodule_finder(__name__)
__getattr__ = module_getattr(__name__)
