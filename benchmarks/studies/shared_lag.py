"""What a one-step lag of the shared index's appends costs in acceptance (bench_peers, DAS only).

    python benchmarks/studies/shared_lag.py [--datasets skythought,verl_gsm8k]

The idea it tests (issue 12): the feedback's native job appends the batch's accepted tokens
to the per-problem indexes and to the shared index (~3 ms single-threaded at 512 rows,
``append_split.py``) before it pre-drafts the next plan's trees. Appending to the shared
index one step later -- in the next verify forward's shadow -- takes that task off the
job; the next plan's trees then read a shared index without the previous step's tokens.
Here the ``bench_peers`` DAS peer (server protocol, product defaults) runs twice: as is,
and with every row's shared-index append of round t applied after round t+1's drafts
(the per-problem append stays immediate). Prints tokens per step of both per slice.

Measured (product defaults): SkyThought uncapped 3.6350 -> 3.3545 (-7.7%), capped 9.0249 ->
8.5936 (-4.8%), verl 3.2578 -> 2.5862 (-20.6%). Why so much: a draft reads the shared index
at the request's own copy there (``SuffixIndex::draft_for_sequence`` finds the same seq_id
in the shared index and matches from its end), so a lagging copy matches a context a few
tokens old and mixes in continuations for the wrong position. A lagged design would have
to match the shared index from the request's current context instead (not measured).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import json  # noqa: E402

import bench_peers as bp  # noqa: E402
import numpy as np  # noqa: E402


def lagged() -> None:
    """Patch the DAS peer: shared-index appends one round late."""
    propose, end = bp.DasPeer.propose, bp.DasPeer.end

    def extend(self, rid, context, new):
        d = self.d
        live = d._request(rid)
        arr = np.asarray(new, dtype=np.int32)
        d._indices[live.problem_id].extend(live.seq_id, arr)
        if d._global is not None:
            self._lag = getattr(self, "_lag", []) + [(live.seq_id, arr)]

    def flush(self):  # the appends made since the previous round's drafts
        d = self.d
        for seq_id, arr in getattr(self, "_lag", []):
            d._apply_unshare()
            d._global.extend(seq_id, arr)
        self._lag = []

    def lag_propose(self, rids, budget):
        out = propose(self, rids, budget)
        flush(self)  # the previous round's shared appends, after this round's drafts
        return out

    def lag_end(self):
        flush(self)
        return end(self)

    bp.DasPeer.extend, bp.DasPeer.propose, bp.DasPeer.end = extend, lag_propose, lag_end


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = ["--skip", "sglang_ngram,arctic"] + argv
    out = {}
    for name in ("as is", "shared lag"):
        if name == "shared lag":
            lagged()
        path = f"/tmp/shared_lag_{name.replace(' ', '_')}.json"
        bp.main(["--json", path] + common)
        d = json.load(open(path))["datasets"]
        out[name] = {f"{ds}/{sl}": v["das"]["tokens_per_step"] for ds, slices in d.items() for sl, v in slices.items()
                     if isinstance(v, dict) and "das" in v}
    for key in out["as is"]:
        a, b = out["as is"][key], out["shared lag"][key]
        print(f"{key:28s} as is {a:.4f}  shared lag {b:.4f}  ({100 * (b / a - 1):+.2f}%)")


if __name__ == "__main__":
    main()
