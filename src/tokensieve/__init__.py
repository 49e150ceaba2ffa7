"""tokensieve: training-free visual token reduction for vision-language models.

>>> import torch, tokensieve as ts
>>> r = ts.reduce(torch.randn(2, 576, 64), method="divprune", keep=64)
>>> r.indices.shape
torch.Size([2, 64])
"""

from tokensieve.core import (
    SIGNAL_NAMES,
    MethodSpec,
    Partitions,
    ReduceConfig,
    Reduction,
    Signals,
    describe,
    get_method,
    list_methods,
    reduce,
    register,
)
from tokensieve.models import applied, apply, remove

__version__ = "0.1.0"

__all__ = [
    "SIGNAL_NAMES", "MethodSpec", "Partitions", "ReduceConfig", "Reduction", "Signals",
    "__version__", "applied", "apply", "describe", "get_method", "list_methods", "reduce",
    "register", "remove",
]
