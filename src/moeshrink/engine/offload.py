"""What the layer-wise runner needs to work on models larger than memory.

:class:`LayerHooks` lets a caller materialise a decoder layer's weights just before the runner uses
it and write / free them right after (:class:`moeshrink.io.streaming.LayerStreamer` does this), and
:class:`SpilledBatches` keeps the cached hidden states of the calibration batches on disk instead of
in memory (``--offload-hidden DIR``).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


class LayerHooks(Protocol):
    """Called by the runner around its use of each decoder layer."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Materialise decoder layer ``index``'s weights (before the runner touches it)."""

    def release(self, index: int, layer: nn.Module) -> None:
        """The runner is done with decoder layer ``index``: write and free it."""


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
        torch.save(tensor.detach().cpu(), file)
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
