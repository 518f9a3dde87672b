"""Interpreter-start hook of the CPU development mode (``das_sglang_cpu.pth``).

Python runs the ``import`` line of ``das_sglang_cpu.pth`` (installed next to the package)
at every start; it imports this module only when ``DAS_SGLANG_CPU=1``. Then the SGLang
stand-ins come first on the import path before any ``import sglang`` (SGLang imports
``torchvision`` and ``sgl_kernel`` at module level, which a CPU-only machine lacks). Never
raises: a failure here is printed once and the interpreter starts normally.
"""

from __future__ import annotations

import sys

try:
    from das_sglang.sglang.cpu import prepare_imports

    prepare_imports()
except Exception as e:  # pragma: no cover - must never break interpreter start
    print(f"das-sglang: DAS_SGLANG_CPU=1 but CPU mode could not be prepared: {e}", file=sys.stderr)
