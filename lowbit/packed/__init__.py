"""Packed low-bit storage formats."""

from lowbit.packed.qweight import QuantizedWeight

__all__ = ["QuantizedWeight"]
