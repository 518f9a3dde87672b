"""Offline trace replay: rollout loaders (``datasets``), the lockstep replay simulator
(``simulator``), the baseline drafters and contenders it compares (``baselines``,
``contenders``) and its reports (``report``).

A client of ``das_sglang.core`` (as ``das_sglang.sglang`` is): replay imports core, core
never imports replay. Pure Python + numpy + the native index, like core.
"""
