"""The few collectives the training workers need, no-ops when a run has one worker."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["barrier", "report_progress", "sum_over_workers"]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def sum_over_workers(value: float, world: int, device: Any) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def report_progress(rank: int, epoch: int, step: int, *, steps: int, loss_sum: float) -> None:
    """Rank 0 prints about ten lines an epoch (Ray forwards workers' output to the driver)."""
    if rank == 0 and (step == steps or step % max(1, steps // 10) == 0):
        print(
            f"epoch {epoch}: step {step}/{steps}, mean step loss {loss_sum / step:.4f}", flush=True
        )
