"""Shared fixtures: tiny random checkpoints of every family (real files), calibration text."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from moeshrink.testbed.paths import DOMAINS, corpus_dir
from moeshrink.testbed.tiny import FAMILY_CONFIG, build_tiny_model

# Jobs verify their output in a fresh process by default; the suite turns that off (seconds per prune)
# and the verification tests turn it back on explicitly.
os.environ["MOESHRINK_VERIFY"] = "0"

FAMILIES = sorted(FAMILY_CONFIG)
# Experts kept per family in the end-to-end tests: DeepSeek's grouped routing keeps 2 of 4 per group.
KEEP = {family: 4 for family in FAMILIES}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_model(family, root / family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """Real text that does not change with the code: the shipped testbed corpus's calibration splits
    of every domain (tens of thousands of tokens)."""
    text = "\n\n".join(
        json.loads(line)["text"]
        for domain in DOMAINS
        for line in (corpus_dir() / domain / "calib.jsonl").read_text().splitlines()
        if line.strip()
    )
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text)
    return path


def broken_copy(tmp_path: Path, source: Path, change) -> Path:
    """A copy of the one-shard checkpoint ``source`` whose tensors ``change(state)`` has altered."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(source, path)
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def assert_one_layer_at_a_time(source) -> None:
    """A quantized layer source holds one decoder layer, dequantized to bfloat16, at a time."""
    import torch

    for index in range(len(source.layers)):
        source.load(index)
        assert source.layers[index].mlp.experts.gate_up_proj.dtype == torch.bfloat16
        source.release(index, write=True)
        assert all(p.is_meta for p in source.layers[index].parameters())
    assert source.max_loaded == 1


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
