"""The few collectives the training workers need, no-ops when a run has one worker."""

from __future__ import annotations

from typing import Any

__all__ = ["barrier", "sum_over_workers"]


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_workers(value: float, world: int, device: Any) -> float:
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
