"""Native suffix index (C++17, nanobind): see docs/design.md "Native index"."""

from das_sglang.native._suffix import SuffixIndex

__all__ = ["SuffixIndex"]
