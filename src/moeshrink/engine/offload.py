"""Where the layer loop gets its layers and keeps its hidden states.

A :class:`LayerSource` gives the loop one decoder layer at a time and takes it back: resident
(:class:`ResidentLayers`, the whole model in memory) or streamed from the shards
(:class:`moeshrink.io.streaming.StreamedLayers`, one layer in memory, written out as it is released).
:class:`SpilledBatches` keeps the cached hidden states of the calibration batches on disk instead of
in memory (``--offload-hidden DIR``).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter
from moeshrink.errors import MoeShrinkError, is_out_of_space


class LayerSource(Protocol):
    """A model whose decoder layers the layer loop asks for one at a time."""

    model: nn.Module
    adapter: FamilyAdapter
    # Whether a layer changed in one pass is still changed in the next (False when streaming).
    keeps_changes: bool

    def load(self, index: int) -> None:
        """Materialise decoder layer ``index``'s weights (before the loop touches it)."""

    def release(self, index: int, *, write: bool) -> None:
        """The loop is done with decoder layer ``index`` in this pass; ``write``: it is final."""

    def open_output(self, fused_experts: bool) -> None:
        """Called once before the final pass: whether the experts are written fused (per-layer counts)."""


@dataclass
class ResidentLayers:
    """The whole model in memory: nothing to load, free or write per layer."""

    model: nn.Module
    adapter: FamilyAdapter
    keeps_changes: bool = True

    def load(self, index: int) -> None:
        """Already in memory."""

    def release(self, index: int, *, write: bool) -> None:
        """Stays in memory; the export writes the whole model."""

    def open_output(self, fused_experts: bool) -> None:
        """The export chooses the layout from the plan."""


class SpilledBatches:
    """A list of tensors (one per calibration batch) kept on disk, read back one at a time.

    Each instance owns a fresh directory under ``root``, removed when the instance is garbage
    collected, so the previous layer's hidden states disappear as soon as the runner drops them."""

    def __init__(self, root: str | Path, device: torch.device | str = "cpu"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="hidden-", dir=self.root))
        self.device = torch.device(device)
        self.files: list[Path] = []
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)

    @classmethod
    def of(
        cls, tensors: Iterable[torch.Tensor], root: str | Path, device: torch.device | str
    ) -> SpilledBatches:
        """Spill ``tensors`` to a new directory under ``root``."""
        out = cls(root, device)
        for tensor in tensors:
            out.append(tensor)
        return out

    def empty_like(self) -> SpilledBatches:
        """An empty list spilling to the same root and device."""
        return SpilledBatches(self.root, self.device)

    def append(self, tensor: torch.Tensor) -> None:
        file = self.directory / f"{len(self.files):06d}-{uuid.uuid4().hex[:6]}.pt"
        try:
            with file.open("wb") as f:  # through a Python file, a full disk is an OSError torch keeps
                torch.save(tensor.detach().cpu(), f)
        except Exception as e:
            file.unlink(missing_ok=True)
            if is_out_of_space(e):
                raise MoeShrinkError(
                    f"the disk filled up while the calibration hidden states were written to {self.root} "
                    "(--offload-hidden): free some space there, choose another directory, or keep them in RAM"
                ) from e
            raise
        self.files.append(file)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for file in self.files:
            yield torch.load(file, map_location=self.device, weights_only=True)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.load(self.files[i], map_location=self.device, weights_only=True)

    def close(self) -> None:
        self._cleanup()
