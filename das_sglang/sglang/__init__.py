"""SGLang integration: the ``DAS`` speculative algorithm (the only package importing sglang).

Installed through the ``sglang.srt.plugins`` entry point (``plugin.register``); see
docs/sglang.md. ``cpu/`` is the CPU development mode, activated explicitly.
"""
