"""The layout parameters of a group-wise integer weight format."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.errors import RecipeError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """Bits per code, group size along ``in_features`` (-1 = one group per row), symmetry, zero storage.

    Asymmetric: ``w = (q - zero) * scale`` with a per-group ``zero`` in code units, stored as fp16,
    or with ``int_zero`` as an integer code in ``[0, 2**bits)`` packed like the weight codes (as
    GPTQ and AutoRound checkpoints store it: 3-bit g128 costs 3 + 19/128 bits instead of 3 + 32/128).
    Symmetric: ``zero`` is the fixed midpoint ``2**(bits-1)`` and is not stored.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    int_zero: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise RecipeError(f"bits={self.bits!r} unsupported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 8):
            raise RecipeError(f"group_size={self.group_size!r} invalid; use -1 (per channel) or an integer >= 8")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric={self.symmetric!r} must be true or false")
        if not isinstance(self.int_zero, bool):
            raise RecipeError(f"int_zero={self.int_zero!r} must be true or false")
        if self.int_zero and self.symmetric:
            raise RecipeError("int_zero applies to asymmetric formats; a symmetric one stores no zero points")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_width(self, in_features: int) -> int:
        """Columns per group for a row of ``in_features`` (the last group may be shorter)."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        g = self.group_width(in_features)
        return -(-in_features // g)

    def to_dict(self) -> dict:
        """Checkpoint metadata; ``int_zero`` only when set, so fp16-zero checkpoints read as before."""
        d = asdict(self)
        if not self.int_zero:
            del d["int_zero"]
        return d
