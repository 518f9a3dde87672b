"""The argument contracts of the real kernels the CPU stand-ins replace.

The same SGLang call sites run these ops on a GPU, where a wrong dtype, shape or layout
is an error (or silent garbage), so a stand-in laxer than the real op hides bugs from
CI. Each stand-in in :mod:`.ops` therefore checks, before computing, what the real op
checks, read from SGLang 0.5.23's kernel sources:

- ops with a CUDA JIT kernel (``sglang/kernels/jit/csrc/speculative/tree.cuh``:
  ``verify_tree_greedy``, ``reconstruct_indices_from_tree_mask``) follow its
  ``TensorMatcher`` declarations: exact dtypes, shapes, contiguous tensors, one device;
- ops whose GPU form is a Triton kernel (no host checks: it reads raw pointers, so a
  wrong dtype or a strided view is silently misread) follow the compiled ``sgl_kernel``
  CPU op they stand in for (``CHECK_INPUT`` = CPU + contiguous, ``CHECK_EQ`` dtypes,
  ``CHECK_DIM``, sizes).

Violations raise RuntimeError, as both real ops do (tvm-ffi maps the JIT kernel's
``PanicError`` to RuntimeError; ``TORCH_CHECK`` raises RuntimeError), with a message
naming the op, the argument and what was expected versus given.
"""

from __future__ import annotations

from typing import Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)  # AT_DISPATCH_INDEX_TYPES


def check_tensor(
    op: str,
    name: str,
    value,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    """``value`` is a contiguous CPU tensor of ``dtype`` and ``shape`` (None = any size)."""
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if value.dtype not in allowed:
            want = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise RuntimeError(
                f"{op}: {name} must have dtype {want}, got {str(value.dtype).removeprefix('torch.')}"
            )
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and value.dim() != ndim:
        raise RuntimeError(
            f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(value.shape)}"
        )
    if shape is not None:
        for dim, (want, got) in enumerate(zip(shape, value.shape)):
            if want is not None and want != got:
                raise RuntimeError(
                    f"{op}: {name} must have size {want} in dimension {dim}, "
                    f"got shape {tuple(value.shape)}"
                )
    if value.device.type != "cpu":
        raise RuntimeError(f"{op}: {name} must be a CPU tensor, got device {value.device}")
    if not value.is_contiguous():
        raise RuntimeError(
            f"{op}: {name} must be contiguous, got shape {tuple(value.shape)} "
            f"strides {value.stride()}"
        )
    return value


def check_same_dtype(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if value.dtype != ref.dtype:
        raise RuntimeError(
            f"{op}: {name} must have the dtype of {ref_name} "
            f"({str(ref.dtype).removeprefix('torch.')}), got {str(value.dtype).removeprefix('torch.')}"
        )


def check_value(op: str, cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(f"{op}: {message}")
