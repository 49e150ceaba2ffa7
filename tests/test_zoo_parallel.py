"""The data-parallel team of the tiny-VLM recipe (tokensieve.zoo.parallel)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from zoo_configs import SMALL

from tokensieve.zoo.build import build_model, build_processor
from tokensieve.zoo.lm_training import (
    LMPhase,
    PromptCodec,
    SymbolicTokens,
    build_bank,
    content_probe,
    patch_labels,
    train_lm,
)
from tokensieve.zoo.parallel import Team, join_team, leave_team
from tokensieve.zoo.scenes import make_scene
from tokensieve.zoo.train import TrainConfig, train_tiny_vlm


def test_parts_cover_the_batch_in_order() -> None:
    for n, world in ((7, 3), (12, 2), (2, 2), (5, 1)):
        bounds = [Team(r, world).bounds(n) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    with pytest.raises(ValueError, match="6 does not split evenly over 4"):
        Team(0, 4).part(6)


class RecordingTeam(Team):
    """A team member that keeps its local gradients instead of averaging them."""

    grads: list[torch.Tensor]

    def average_gradients(self, params) -> None:
        object.__setattr__(self, "grads", [p.grad.clone() for p in params])


def test_members_gradients_average_to_the_whole_batch_gradient() -> None:
    """The members' parts of a batch (images, token subsets, questions) are the batch.

    With the auxiliary losses off and float32, the loss is a mean over equal
    parts, so the mean of the members' gradients is the solo gradient: this
    fails if a member's questions were not those of its images.
    """
    proc = build_processor()
    codec = PromptCodec(proc.tokenizer)
    scenes = [make_scene("train", 10_000_000 + i) for i in range(8)]
    bank, labels = build_bank(scenes, codec, 0), patch_labels(scenes)
    base = build_model(SMALL, proc.tokenizer, seed=0)
    torch.manual_seed(0)
    base_symbolic, base_probe = SymbolicTokens(32), content_probe(32)

    def gradients(team: Team) -> list[torch.Tensor]:
        model, symbolic = copy.deepcopy(base), copy.deepcopy(base_symbolic)

        def tokens(idx, sel):
            lab = torch.gather(labels[idx], 1, sel[..., None].expand(-1, -1, labels.shape[-1]))
            return symbolic(lab, sel)

        params = list(symbolic.parameters()) + list(model.model.language_model.parameters())
        train_lm(model, codec, bank, LMPhase("t", 1, 1e-3, tokens, params,
                                             full_prob=lambda p: 0.5, max_extra=lambda p: 20),
                 copy.deepcopy(base_probe), batch=4, questions_per_image=3, seed=0,
                 attn_weight=0.0, probe_weight=0.0, bf16=False, log=lambda m: None,
                 team=team)
        return team.grads

    solo = gradients(RecordingTeam(0, 1))
    halves = [gradients(RecordingTeam(r, 2)) for r in range(2)]
    assert any(g.abs().sum() > 0 for g in solo)
    for whole, a, b in zip(solo, *halves, strict=True):
        torch.testing.assert_close((a + b) / 2, whole, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(*halves, strict=True))


def _team_check(rank: int, world: int, rendezvous: str) -> None:
    team = join_team(rank, world, rendezvous)
    try:
        # average: rank r holds r + 1 on the first parameter and no gradient on the second
        w, v = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        w.grad = torch.full((3,), float(rank + 1))
        team.average_gradients([w, v])
        assert torch.equal(w.grad, torch.full((3,), (world + 1) / 2))
        assert torch.equal(v.grad, torch.zeros(2))
        # gather: 5 rows over the members, uneven parts, bfloat16 kept exactly
        start, stop = team.bounds(5)
        rows = (torch.arange(start, stop, dtype=torch.float32)[:, None] / 3).bfloat16()
        whole = team.gather_rows(rows.expand(-1, 4).contiguous(), 5)
        expect = (torch.arange(5, dtype=torch.float32)[:, None] / 3).bfloat16().expand(-1, 4)
        assert whole.dtype == torch.bfloat16 and torch.equal(whole, expect)
    finally:
        leave_team(team)


def test_team_averages_gradients_and_gathers_rows(tmp_path) -> None:
    rendezvous = os.fspath(tmp_path / "rendezvous")
    ctx = mp.get_context("spawn")
    member = ctx.Process(target=_team_check, args=(1, 2, rendezvous))
    member.start()
    _team_check(0, 2, rendezvous)
    member.join(timeout=120)
    assert member.exitcode == 0


def test_batches_that_do_not_split_over_the_team_are_rejected() -> None:
    with pytest.raises(ValueError, match="lm_batch=5 must split evenly over team_size=2"):
        train_tiny_vlm(TrainConfig(lm_batch=5), SMALL)
