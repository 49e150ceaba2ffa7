"""Data types and tensor operations shared by every method."""

from tokensieve.core.api import ReduceConfig, reduce
from tokensieve.core.budget import resolve_keep
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import MethodSpec, describe, get_method, list_methods, register
from tokensieve.core.signals import SIGNAL_NAMES, Partitions, Signals

__all__ = [
    "SIGNAL_NAMES", "MethodSpec", "Partitions", "ReduceConfig", "Reduction", "Signals",
    "describe", "get_method", "list_methods", "reduce", "register", "resolve_keep",
]
