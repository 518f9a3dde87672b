"""The `das` command line: one module per command, joined in ``das_sglang.cli.app``."""
