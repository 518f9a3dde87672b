"""Tensor parallelism: one accept decision per step for the whole TP group.

With ``--tp N`` every TP rank runs its own scheduler, its own DAS worker and its own
drafter. The ranks see the same batches and the same committed tokens, so their host
state (history, drafts, budgets) is a deterministic function of the same inputs and
agrees -- as long as the target tokens each rank verifies against agree. Those are the
one device-side input that may differ: logits all-gathered from different shards can
differ in the last bit and sampling kernels are not bitwise reproducible, which would
make ranks accept different drafts, commit different text and then desynchronise the
collective forward passes. So the target tokens are decided once, on TP rank 0, and
broadcast (:meth:`TpGroup.agree`); every rank then walks the same trees with the same
targets and takes the same accept decision. The verify's measured seconds, from which the
worker's CUDA-graph tiers choose verify widths, are rank 0's too (:meth:`TpGroup.agree_value`).
Only TP rank 0 writes history snapshots
(:attr:`TpGroup.is_writer`); every rank loads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TpGroup:
    rank: int  # rank inside the TP group
    size: int
    src: int  # global rank of the group's rank 0 (torch.distributed.broadcast's src)
    group: object = None  # torch.distributed process group of the device tensors

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` replaced in place by TP rank 0's (a no-op without TP)."""
        if self.size > 1:
            torch.distributed.broadcast(tokens, src=self.src, group=self.group)
        return tokens

    def agree_value(self, value: float, device="cpu") -> float:
        """TP rank 0's ``value`` on every rank (``value`` itself without TP). For host
        inputs that differ per rank by nature -- the verify forward's measured seconds
        that the CUDA-graph tiers (core/graph_tiers.py) decide widths from: decided on
        one rank, or the ranks would submit different verify shapes to one collective
        forward."""
        if self.size <= 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, src=self.src, group=self.group)
        return float(t.item())


SINGLE = TpGroup(rank=0, size=1, src=0)


def from_sglang() -> TpGroup:
    """The TP group of this SGLang worker process (SGLang's ``GroupCoordinator``)."""
    from sglang.srt.runtime_context import get_parallel

    coordinator = get_parallel().tp_group
    if coordinator is None or coordinator.world_size <= 1:
        return SINGLE
    return TpGroup(
        rank=coordinator.rank_in_group,
        size=coordinator.world_size,
        src=coordinator.ranks[0],
        group=coordinator.device_group,
    )


def from_torch_distributed(group=None) -> TpGroup:
    """A TP group over an initialised ``torch.distributed`` group (default: the world)."""
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group) if group is not None else list(
        range(dist.get_world_size())
    )
    return TpGroup(rank=dist.get_rank(group), size=len(ranks), src=ranks[0], group=group)
