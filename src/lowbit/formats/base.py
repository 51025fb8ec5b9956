"""The contract every stored weight format keeps, and the registry of formats by kind."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.errors import CheckpointError, ShapeError

FORMATS: dict[str, type["WeightFormat"]] = {}


class WeightFormat(ABC):
    """A compressed (out_features, in_features) weight: owns its tensors, bytes and dequantization."""

    kind: ClassVar[str]

    def __init_subclass__(cls, kind: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if kind is not None:
            cls.kind = kind
            FORMATS[kind] = cls

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor by name; exactly what a checkpoint writes."""

    @abstractmethod
    def meta(self) -> dict:
        """JSON-able description (kind, shape, layout parameters) that rebuilds the format with its tensors."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, Tensor]) -> "WeightFormat": ...

    @classmethod
    @abstractmethod
    def empty(cls, meta: dict) -> "WeightFormat":
        """Uninitialised tensors of the right shapes and dtypes, to be filled by a checkpoint load."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out_features, in_features) weight the codes stand for."""

    def nbytes(self) -> int:
        """Exact bytes stored: the sum over :meth:`tensors`."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        out_f, in_f = self.shape
        return 8 * self.nbytes() / (out_f * in_f)


def check_tensors(owner, want: dict[str, tuple[tuple[int, ...], torch.dtype]], what: str) -> None:
    """Every ``owner.<name>`` has the wanted (shape, dtype); else a ShapeError naming ``what``."""
    for name, (shape, dtype) in want.items():
        t = getattr(owner, name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            got = None if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ShapeError(f"{what}: {name} must be {dtype} {shape}, got {got}")


def format_from_tensors(meta: dict, tensors: dict[str, Tensor]) -> WeightFormat:
    return format_class(meta).from_tensors(meta, tensors)


def format_class(meta: dict) -> type[WeightFormat]:
    kind = meta.get("kind")
    if kind not in FORMATS:
        raise CheckpointError(f"unknown weight format {kind!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[kind]
