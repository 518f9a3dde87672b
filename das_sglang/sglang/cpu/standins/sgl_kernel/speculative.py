"""Stand-in for ``sgl_kernel.speculative`` (CPU development mode)."""

from das_sglang.sglang.cpu.ops import reconstruct_indices_from_tree_mask  # noqa: F401
