"""Pure algorithm core: numpy + the native index only (no torch, sglang or flashinfer)."""
