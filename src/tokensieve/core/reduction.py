"""The result every method returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Reduction:
    """What a method did to a token set of shape ``[B, N, D]``.

    Attributes:
        tokens: reduced tokens ``[B, K', D]``, in the method's output order (original
            order for subset methods).
        indices: ``[B, K]`` kept source positions, ascending, for the tokens a method
            keeps unchanged (all of them for subset methods; the dominant part for
            methods that also emit merged tokens); ``None`` for pure merging.
        positions: ``[B, K']`` a source position that represents each output token
            (the kept position, or the target/centre of a merged group). Adapters use
            it for position ids; it equals ``indices`` for subset methods.
        sizes: ``[B, K']`` how many source tokens each output token stands for
            (``None`` when every output token is one source token).
        mask: ``[B, K']`` bool, True for real tokens; only set by adaptive-count
            methods whose counts differ across the batch (padding is False).
        assignment: ``[B, N]`` the output slot each source token went into, ``-1``
            if dropped (``None`` when not tracked). Used for visualising merges.
        groups: ``[B, K']`` long, the group each output token belongs to, for methods whose
            later stage selects per group (PruneVid: a segment's static tokens, a frame's
            dynamic ones); ``-1`` on padding; ``None`` otherwise.
    """

    tokens: Tensor
    indices: Tensor | None = None
    positions: Tensor | None = None
    sizes: Tensor | None = None
    mask: Tensor | None = None
    assignment: Tensor | None = None
    groups: Tensor | None = None

    def __post_init__(self) -> None:
        if self.positions is None and self.indices is not None:
            if self.indices.shape[1] == self.tokens.shape[1]:
                self.positions = self.indices

    @property
    def num_tokens(self) -> int:
        """K', the number of output tokens (including padding, if any)."""
        return int(self.tokens.shape[1])
