"""Data parallelism over CPU processes for the tiny-VLM training recipe.

The tiny tower and LM scale poorly across threads of one process. Measured on
2 cores in one run each: a refine step (batch 32) took 1.33 s as two 1-thread
processes of 16 against about 1.5 s as one 2-thread process; an LM step on 16
images of 576 tokens, 0.73 s against 1.03 s. So the stages after stage 1 run as a team of
processes (``torch.distributed`` with gloo): every member draws the same global
batch from the same seeded generators, computes the loss on its own part and
the gradients are averaged before the (identical) optimiser steps. The result
depends on the team size and threads per member, not on timing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Team:
    """This process's place in the team: ``rank`` of ``world`` members (1: no team)."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        """Whether this member logs and reports (rank 0)."""
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this member's contiguous part of ``n`` items (sizes differ by <= 1)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def part(self, n: int) -> slice:
        """This member's part of a batch of ``n``; it must split evenly (equal-weight averaging)."""
        if n % self.world:
            raise ValueError(f"a batch of {n} does not split evenly over {self.world} processes")
        return slice(*self.bounds(n))

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the team (one all-reduce).

        A parameter without a gradient counts as a zero gradient, so that all
        members hold the same gradients and take the same optimiser step.
        """
        if self.world == 1:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every member's ``part`` (its ``bounds(n)`` rows), in rank order."""
        if self.world == 1:
            return part
        size = -(-n // self.world)  # all_gather needs equal shapes: pad to the largest part
        padded = part.new_zeros((size, *part.shape[1:]))
        padded[:len(part)] = part
        # gloo gathers float32 reliably; the features are bfloat16
        pieces = [torch.empty_like(padded, dtype=torch.float32) for _ in range(self.world)]
        dist.all_gather(pieces, padded.float())
        rows = []
        for rank, piece in enumerate(pieces):
            start, stop = Team(rank, self.world).bounds(n)
            rows.append(piece[:stop - start].to(part.dtype))
        return torch.cat(rows)


SOLO = Team()


def join_team(rank: int, world: int, rendezvous_file: str) -> Team:
    """Join (or form) a gloo team of ``world`` CPU processes; ``world`` 1 needs no setup."""
    if world > 1:
        # a member that dies leaves the others waiting in a collective: give up after 10 min
        dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}",
                                rank=rank, world_size=world, timeout=timedelta(minutes=10))
    return Team(rank, world)


def leave_team(team: Team) -> None:
    """Tear the process group down (the counterpart of ``join_team``)."""
    if team.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
