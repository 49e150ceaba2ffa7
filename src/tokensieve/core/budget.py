"""Token budgets: turn a user's ``keep`` (count or fraction) into a count."""

from __future__ import annotations

import math
import numbers


def resolve_keep(keep: int | float, n: int) -> int:
    """Return the number of tokens to keep out of ``n``.

    ``keep`` is either an int count in ``[1, n]`` or a float fraction in ``(0, 1]``
    (rounded to the nearest count, which must be at least 1).
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep={keep!r}: expected an int count or a float fraction in (0, 1]")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if keep <= 0 or keep > n:
            raise ValueError(f"keep={keep}: expected a count in [1, {n}] (the number of tokens)")
        return keep
    keep = float(keep)
    if not math.isfinite(keep) or keep <= 0.0 or keep > 1.0:
        raise ValueError(f"keep={keep}: expected a fraction in (0, 1] or an int count")
    count = int(round(keep * n))
    if count < 1:
        raise ValueError(f"keep={keep}: {keep} x {n} tokens rounds to 0; expected >= 1")
    return count
