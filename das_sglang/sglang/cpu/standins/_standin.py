"""Shared machinery of the stand-in packages (``sgl_kernel``, ``torchvision``).

SGLang imports dozens of names from these packages at module import time but calls only
a handful on the CPU paths das-sglang exercises. A stand-in package serves every
submodule and every name: unknown names are placeholder classes (so they can be
imported, subclassed and have attributes read at class-definition time) that raise
NotImplementedError naming themselves when actually used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        # (a placeholder's attributes are placeholders of its own kind)
        return type(cls)(name, (), {"__qualname__": f"{cls.__qualname__}.{name}"})

    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(
            f"{cls.__qualname__} is not available in das-sglang's CPU development mode"
        )


class _DecoratorPlaceholderMeta(_PlaceholderMeta):
    """A placeholder that can also decorate: ``@pkg.jit`` on a function at import time
    gives a function that raises NotImplementedError naming both when it is called."""

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            fn, deco = args[0], cls.__qualname__

            def unavailable(*_a, **_k):
                raise NotImplementedError(
                    f"{getattr(fn, '__qualname__', fn)} (decorated by {deco}) is not "
                    "available: its package is a das-sglang stand-in"
                )

            unavailable.__name__ = getattr(fn, "__name__", "unavailable")
            unavailable.__qualname__ = getattr(fn, "__qualname__", unavailable.__name__)
            return unavailable
        raise NotImplementedError(
            f"{cls.__qualname__} is not available: its package is a das-sglang stand-in"
        )


def placeholder(qualname: str, decorators: bool = False) -> type:
    meta = _DecoratorPlaceholderMeta if decorators else _PlaceholderMeta
    return meta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


def module_getattr(module_name: str, decorators: bool = False):
    """A module-level ``__getattr__`` returning placeholders for unknown names."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(f"{module_name}.{name}", decorators)

    return __getattr__


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``<package>.<anything>`` as an empty placeholder module."""

    def __init__(self, package: str, decorators: bool = False):
        self.package = package
        self.decorators = decorators

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(self.package + "."):
            return None
        # Real submodules on disk take precedence over generated ones.
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            if isinstance(finder, _SubmoduleFinder):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = module_getattr(spec.name, self.decorators)
        return module

    def exec_module(self, module):
        return None


def install_submodule_finder(package: str, decorators: bool = False) -> None:
    if not any(isinstance(f, _SubmoduleFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_SubmoduleFinder(package, decorators))
