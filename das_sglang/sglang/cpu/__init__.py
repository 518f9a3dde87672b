"""CPU development mode: run real, stock SGLang with speculative decoding on a CPU.

Activated explicitly, never on GPU: ``DAS_SGLANG_CPU=1`` in the environment (the
plugin's ``register()`` then calls :func:`activate` in every SGLang process) or
``das_sglang.sglang.cpu.activate()`` before SGLang is imported. It

- sets ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's own CPU switch);
- puts the ``standins/`` directory first on ``sys.path`` and ``PYTHONPATH`` (so spawned
  scheduler processes see it too): a ``sgl_kernel`` stand-in whose CPU speculative ops
  are torch code (:mod:`.ops`) and a ``torchvision`` stand-in;
- replaces the ``torch_native`` entry of SGLang's attention registry by a subclass with
  tree-mask TARGET_VERIFY support (:mod:`.attention`).

Nothing here edits or patches SGLang: it uses the import path and SGLang's registry.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_SWITCH = "DAS_SGLANG_CPU"
STANDINS = str(Path(__file__).resolve().parent / "standins")

# Engine settings known to work for CPU development (see docs/sglang.md).
ENGINE_KWARGS = dict(
    device="cpu",
    attention_backend="torch_native",
    sampling_backend="pytorch",
    disable_cuda_graph=True,
    dtype="float32",
    mem_fraction_static=0.2,
    max_total_tokens=32768,
)


def requested() -> bool:
    return os.environ.get(ENV_SWITCH, "") == "1"


def prepare_imports() -> None:
    """The import-time half of :func:`activate` (no torch, no sglang import): SGLang's
    CPU switch and the stand-ins first on the import path. Run at interpreter start when
    ``DAS_SGLANG_CPU=1`` (``das_sglang_cpu.pth``, installed with the package), so a plain
    ``import sglang`` script works in CPU development mode; the plugin's ``register()``
    completes the activation in every SGLang process."""
    os.environ[ENV_SWITCH] = "1"
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    if STANDINS not in sys.path:
        sys.path.insert(0, STANDINS)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if STANDINS not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([STANDINS, *filter(None, paths)])


def activate() -> None:
    """Turn CPU development mode on in this process and the processes it spawns."""
    if _gpu_present():
        raise RuntimeError(
            f"{ENV_SWITCH}: CPU development mode must not be used on a machine with a GPU"
        )
    prepare_imports()
    if "sglang.srt.layers.attention.attention_registry" in sys.modules or _sglang_importable():
        _register_attention()


def _register_attention() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from das_sglang.sglang.cpu.attention import create_backend

    register_attention_backend("torch_native")(create_backend)


def _sglang_importable() -> bool:
    try:
        import sglang  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()
