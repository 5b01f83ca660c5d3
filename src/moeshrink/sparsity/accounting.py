"""Exact sparsity accounting: how many parameters are exactly zero, per tensor, layer, experts, all.

Zeros in dense tensors save neither memory nor time when served (dense kernels multiply them all,
and vLLM dropped its 2:4 sparse kernels), so the report also says what the zeros would buy if the
tensors were stored compressed: values of the non-zeros plus an index each, or plus a bitmask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

DENSE_NOTE = (
    "zeros stored in dense tensors save no memory and no time when served; they pay off only with "
    "compressed storage, CPU sparse kernels, or quantization afterwards"
)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def _check_counts(total: int, zeros: int, dtype_bytes: int) -> None:
    if not 0 <= zeros <= total:
        raise ValueError(f"need 0 <= zeros <= total: got zeros={zeros}, total={total}")
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be positive: got {dtype_bytes}")


def compressed_bytes(total: int, zeros: int, dtype_bytes: int, index_bits: int = 16) -> int:
    """Bytes of a simple compressed-sparse storage: each non-zero value plus an ``index_bits`` index.

    Row pointers and headers are ignored (negligible for large matrices). 2:4 metadata is 2 bits per
    kept value, so ``index_bits=2`` gives the size of a 2:4 compressed tensor.
    """
    _check_counts(total, zeros, dtype_bytes)
    if index_bits <= 0:
        raise ValueError(f"index_bits must be positive: got {index_bits}")
    nonzeros = total - zeros
    return nonzeros * dtype_bytes + math.ceil(nonzeros * index_bits / 8)


def bitmask_bytes(total: int, zeros: int, dtype_bytes: int) -> int:
    """Bytes of bitmask storage: each non-zero value plus one bit per entry saying which are non-zero."""
    _check_counts(total, zeros, dtype_bytes)
    return (total - zeros) * dtype_bytes + math.ceil(total / 8)


def layer_of(name: str) -> int | None:
    """Decoder layer index of a parameter name (``model.layers.3.mlp...`` -> 3), or None."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def is_expert_parameter(name: str) -> bool:
    """Default test for a routed-expert parameter: it lives in an ``experts`` module (not shared ones)."""
    return ".experts." in f".{name}"


@dataclass(frozen=True)
class TensorSparsity:
    """Exact zero count of one named parameter."""

    name: str
    total: int
    zeros: int
    dtype_bytes: int
    layer: int | None = None
    expert: bool = False

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityTotals:
    """Aggregated counts and storage sizes over a group of tensors (each tensor stored on its own)."""

    total: int = 0
    zeros: int = 0
    dense_bytes: int = 0
    compressed_bytes: int = 0
    bitmask_bytes: int = 0

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    @classmethod
    def of(cls, tensors: Iterable[TensorSparsity], index_bits: int = 16) -> SparsityTotals:
        tensors = list(tensors)
        return cls(
            total=sum(t.total for t in tensors),
            zeros=sum(t.zeros for t in tensors),
            dense_bytes=sum(t.total * t.dtype_bytes for t in tensors),
            compressed_bytes=sum(
                compressed_bytes(t.total, t.zeros, t.dtype_bytes, index_bits) for t in tensors
            ),
            bitmask_bytes=sum(bitmask_bytes(t.total, t.zeros, t.dtype_bytes) for t in tensors),
        )

    def to_dict(self) -> dict[str, int | float]:
        return {
            "total": self.total,
            "zeros": self.zeros,
            "fraction": self.fraction,
            "dense_bytes": self.dense_bytes,
            "compressed_bytes": self.compressed_bytes,
            "bitmask_bytes": self.bitmask_bytes,
        }


@dataclass(frozen=True)
class SparsityReport:
    """Zeros per tensor, with aggregates per layer, over expert parameters and over all parameters."""

    tensors: tuple[TensorSparsity, ...]
    index_bits: int = 16
    layers: dict[int, SparsityTotals] = field(init=False, repr=False)
    experts: SparsityTotals = field(init=False, repr=False)
    all: SparsityTotals = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_layer: dict[int, list[TensorSparsity]] = {}
        for t in self.tensors:
            if t.layer is not None:
                by_layer.setdefault(t.layer, []).append(t)
        layers = {i: SparsityTotals.of(ts, self.index_bits) for i, ts in sorted(by_layer.items())}
        object.__setattr__(self, "layers", layers)
        object.__setattr__(
            self, "experts", SparsityTotals.of([t for t in self.tensors if t.expert], self.index_bits)
        )
        object.__setattr__(self, "all", SparsityTotals.of(self.tensors, self.index_bits))

    @property
    def fraction(self) -> float:
        """Fraction of all parameters that are exactly zero."""
        return self.all.fraction

    @property
    def expert_fraction(self) -> float:
        """Fraction of routed-expert parameters that are exactly zero."""
        return self.experts.fraction

    def tensor(self, name: str) -> TensorSparsity:
        return next(t for t in self.tensors if t.name == name)

    def to_dict(self) -> dict:
        return {
            "tensors": [
                {
                    "name": t.name,
                    "total": t.total,
                    "zeros": t.zeros,
                    "fraction": t.fraction,
                    "dtype_bytes": t.dtype_bytes,
                    "layer": t.layer,
                    "expert": t.expert,
                }
                for t in self.tensors
            ],
            "layers": {str(i): totals.to_dict() for i, totals in self.layers.items()},
            "experts": self.experts.to_dict(),
            "all": self.all.to_dict(),
            "index_bits": self.index_bits,
            "note": DENSE_NOTE,
        }

    def to_text(self) -> str:
        """A few lines: overall and expert sparsity, the per-layer range, and what storage would buy."""

        def line(label: str, s: SparsityTotals) -> str:
            return f"{label}: {s.zeros:,} of {s.total:,} parameters zero ({100 * s.fraction:.2f}%)"

        lines = [line("all", self.all), line("experts", self.experts)]
        if self.layers:
            lo = min(self.layers, key=lambda i: self.layers[i].fraction)
            hi = max(self.layers, key=lambda i: self.layers[i].fraction)
            lines.append(
                f"per layer: {100 * self.layers[lo].fraction:.2f}% (layer {lo}) to "
                f"{100 * self.layers[hi].fraction:.2f}% (layer {hi})"
            )
        a = self.all
        lines.append(
            f"storage: dense {a.dense_bytes:,} B; compressed ({self.index_bits}-bit index) "
            f"{a.compressed_bytes:,} B; bitmask {a.bitmask_bytes:,} B"
        )
        lines.append(f"note: {DENSE_NOTE}")
        return "\n".join(lines)


def count_sparsity(
    model: nn.Module, expert_param_names: set[str] | None = None, index_bits: int = 16
) -> SparsityReport:
    """Count exact zeros (``== 0``, so -0.0 too) of every named parameter of ``model``.

    ``expert_param_names`` lists the routed-expert parameters by full name; by default, parameters
    inside an ``experts`` module. Tied parameters are counted once (``named_parameters`` dedupes).
    """
    tensors = [tensor_sparsity(name, param, expert_param_names) for name, param in model.named_parameters()]
    return SparsityReport(tuple(tensors), index_bits)


def tensor_sparsity(
    name: str, param: torch.Tensor, expert_param_names: set[str] | None = None
) -> TensorSparsity:
    """Exact zero count of one parameter by its full name (see :func:`count_sparsity`)."""
    total = param.numel()
    zeros = total - int(param.detach().count_nonzero()) if total else 0
    expert = name in expert_param_names if expert_param_names is not None else is_expert_parameter(name)
    return TensorSparsity(name, total, zeros, param.element_size(), layer=layer_of(name), expert=expert)
