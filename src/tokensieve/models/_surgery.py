"""Sequence surgery: drop the placeholder tokens of reduced images from a batch.

Family-agnostic. A prompt holds, per image, a run of placeholder tokens that the model
fills with that image's visual tokens (in the order images appear over the flattened
``[B, T]`` batch). After a reduction an image keeps ``K_i <= N_i`` visual tokens: the first
``K_i`` placeholders of its run stay (they receive the reduced tokens in the reduction's
output order) and the rest are cut. Every other real column is kept; the shortened rows
are re-padded on one side so that the batch stays rectangular (padding columns of the
input are dropped first, so the result is as long as its longest row).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

Align = Literal["left", "right"]


@dataclass
class SurgeryPlan:
    """How to map a ``[B, T]`` sequence onto its shortened ``[B, T']`` version.

    Attributes:
        gather: ``[B, T']`` source column of every new column (0 on new padding columns).
        valid: ``[B, T']`` True where a new column holds a source column (False on the
            padding added by the surgery).
        keep: ``[B, T]`` True for the source columns that stay.
        dropped_before: ``[B, T]`` how many real columns (image placeholders) of the row
            were cut before each column, padding not counted (used to re-index 1D positions
            contiguously: a kept token's position minus the image tokens cut before it).
        image_of: ``[B, T]`` image index of every placeholder column (-1 elsewhere).
        rank: ``[B, T]`` rank of a placeholder column inside its image's run (-1 elsewhere).
        length: ``[B]`` kept length of each row.
    """

    gather: Tensor
    valid: Tensor
    keep: Tensor
    dropped_before: Tensor
    image_of: Tensor
    rank: Tensor
    length: Tensor

    @property
    def new_length(self) -> int:
        return int(self.gather.shape[1])

    @property
    def shift(self) -> Tensor:
        """``[B]`` real columns cut from each row: how far the positions of the tokens after
        the prompt move back."""
        return self.dropped_before[:, -1]

    def rows(self, n: int) -> SurgeryPlan:
        """The plan for ``n`` rows: each of its rows repeated ``n / B`` times in order (the
        expanded batch of beams or ``num_return_sequences``)."""
        b = self.gather.shape[0]
        if n == b:
            return self
        if b == 0 or n % b:
            raise ValueError(f"a batch of {n} rows continues a prompt of {b} rows; expected a "
                             "multiple of it")
        return SurgeryPlan(*(getattr(self, f.name).repeat_interleave(n // b, dim=0)
                             for f in fields(self)))

    def extend(self, x: Tensor, fill: float | int = 0) -> Tensor:
        """Map ``x`` ``[B', M, ...]`` over the caller's whole sequence (the ``T`` prompt
        columns this plan cut, then ``M - T`` later ones) onto the shortened sequence: the
        prompt columns gathered, the later ones appended unchanged. ``B'`` may be a
        multiple of ``B`` (see :meth:`rows`)."""
        t = self.keep.shape[1]
        if x.shape[1] < t:
            raise ValueError(f"{x.shape[1]} columns do not cover the {t} of the prompt")
        plan = self.rows(x.shape[0])
        return torch.cat([plan.take(x[:, :t], fill), x[:, t:]], dim=1)

    def take(self, x: Tensor, fill: float | int = 0, dim: int = 1) -> Tensor:
        """Gather ``x`` (``[B, T, ...]``, or ``[..., B, T]`` with ``dim=-1``) onto the new
        columns; new padding columns get ``fill``."""
        if dim == 1:
            idx = self.gather.reshape(*self.gather.shape, *([1] * (x.dim() - 2)))
            out = torch.gather(x, 1, idx.expand(-1, -1, *x.shape[2:]))
            valid = self.valid.reshape(*self.valid.shape, *([1] * (x.dim() - 2)))
        else:
            lead = x.shape[:-2]
            idx = self.gather.expand(*lead, -1, -1)
            out = torch.gather(x, x.dim() - 1, idx)
            valid = self.valid.expand(*lead, -1, -1)
        return out.masked_fill(~valid, fill)


def placeholder_ranks(placeholder: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    """Image index and rank inside the image's run of every placeholder column.

    Args:
        placeholder: ``[B, T]`` bool, True on placeholder tokens.
        counts: ``N_i``, the placeholder count of every image in batch order.

    Returns:
        ``(image_of [B, T], rank [B, T])``, -1 on non-placeholder columns.
    """
    total = int(placeholder.sum())
    if total != sum(counts):
        raise ValueError(f"the prompts hold {total} image placeholder tokens but the images give "
                         f"{sum(counts)} visual tokens ({counts}); expected them to match")
    flat = placeholder.reshape(-1)
    order = torch.cumsum(flat.long(), 0) - 1
    ends = torch.tensor(counts, device=placeholder.device).cumsum(0)
    image = torch.bucketize(order, ends, right=True)
    starts = ends - torch.tensor(counts, device=placeholder.device)
    rank = order - starts[image.clamp(max=len(counts) - 1)]
    image_of = torch.where(flat, image, -1).reshape(placeholder.shape)
    rank = torch.where(flat, rank, -1).reshape(placeholder.shape)
    return image_of, rank


def plan_surgery(placeholder: Tensor, counts: list[int], kept: list[int], align: Align,
                 attention_mask: Tensor | None = None) -> SurgeryPlan:
    """Plan the removal of the placeholders beyond each image's kept count.

    Padding columns (``attention_mask == 0``) are dropped too, so that the shortened batch
    is as long as its longest row; the rows are then re-padded on one side.

    Args:
        placeholder: ``[B, T]`` bool, True on image placeholder tokens.
        counts: ``N_i`` placeholders of every image (batch order).
        kept: ``K_i <= N_i`` visual tokens every image keeps.
        align: "right" packs each row to the right (new padding on the left, as left-padded
            prompts for generation need); "left" packs to the left (padding on the right).
    """
    if len(kept) != len(counts):
        raise ValueError(f"kept has {len(kept)} entries, expected one per image ({len(counts)})")
    for i, (k, n) in enumerate(zip(kept, counts, strict=True)):
        if not 0 <= k <= n:
            raise ValueError(f"image {i}: keeps {k} tokens, expected 0..{n}")
    image_of, rank = placeholder_ranks(placeholder, counts)
    kept_t = torch.tensor(kept + [0], device=placeholder.device)
    keep = ~placeholder | (rank < kept_t[image_of.clamp(min=0)])
    if attention_mask is not None:
        keep = keep & (attention_mask != 0)
    gather, valid = pack(keep, align)
    length = keep.sum(dim=1)
    real = torch.ones_like(keep) if attention_mask is None else attention_mask != 0
    dropped_before = torch.cumsum((~keep & real).long(), dim=1)
    return SurgeryPlan(gather=gather, valid=valid, keep=keep, dropped_before=dropped_before,
                       image_of=image_of, rank=rank, length=length)


def pack(keep: Tensor, align: Align) -> tuple[Tensor, Tensor]:
    """Gather index ``[B, T']`` and validity of the kept columns ``keep`` ``[B, T]``, packed
    to the right (``align="right"``, padding on the left) or to the left; ``T'`` is the
    longest row."""
    length = keep.sum(dim=1)
    b = keep.shape[0]
    new_t = int(length.max()) if b else 0
    rows, cols = torch.nonzero(keep, as_tuple=True)
    pos = torch.cumsum(keep.long(), dim=1) - 1
    offset = (new_t - length) if align == "right" else torch.zeros_like(length)
    new_cols = pos[rows, cols] + offset[rows]
    gather = torch.zeros(b, new_t, dtype=torch.long, device=keep.device)
    valid = torch.zeros(b, new_t, dtype=torch.bool, device=keep.device)
    gather[rows, new_cols] = cols
    valid[rows, new_cols] = True
    return gather, valid


def check_padding(attention_mask: Tensor | None) -> None:
    """Raise ValueError when a row of a 2D mask has a masked column between real ones:
    only left or right padding can be cut and re-padded (a masked hole would be dropped,
    moving the tokens after it and the image features it covers)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < 3:
        return
    real = attention_mask != 0
    seen = torch.cumsum(real.long(), dim=1)
    after_first = seen > 0
    before_last = seen < seen[:, -1:]
    hole = ~real & after_first & before_last
    if bool(hole.any()):
        row, col = (int(i) for i in torch.nonzero(hole)[0])
        raise ValueError(f"attention_mask: row {row} masks column {col} between real tokens; "
                         "tokensieve cuts prompts padded on the left or the right only (drop "
                         "the masked tokens from the prompt instead)")


def detect_align(attention_mask: Tensor | None) -> Align:
    """"right" (pack right, pad left) unless the batch is right-padded."""
    if attention_mask is None or attention_mask.dim() != 2:
        return "right"
    return "right" if bool((attention_mask[:, -1] != 0).all()) else "left"
