"""Shared fixtures: tiny random checkpoints of every family (real files), calibration text."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pytest

from moeshrink.testbed.tiny import FAMILY_CONFIG, build_tiny_model

FAMILIES = sorted(FAMILY_CONFIG)
# Experts kept per family in the end-to-end tests: DeepSeek's grouped routing keeps 2 of 4 per group.
KEEP = {family: 4 for family in FAMILIES}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_model(family, root / family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """Real text: this project's own source files (several thousand tokens)."""
    src = Path(__file__).resolve().parents[1] / "src" / "moeshrink"
    text = "\n\n".join(
        Path(f).read_text() for f in sorted(glob.glob(str(src / "**" / "*.py"), recursive=True))
    )
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text)
    return path


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (to check that inputs are never modified)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def pytest_configure(config):
    """Tiny models gain nothing from several threads; one keeps a 2-core machine responsive."""
    import torch

    torch.set_num_threads(1)
