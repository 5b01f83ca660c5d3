"""Data-parallel calibration: torchrun with 2 CPU processes (gloo) gives the checkpoint 1 process gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import moeshrink
from moeshrink.plan import PLAN_FILENAME


def _torchrun(args: list[str], cwd) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        cmd + ["-m", "moeshrink", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method, exact", [("reap", True), ("uncurl", False)])
def test_two_processes_match_one(method, exact, checkpoints, calib_file, tmp_path):
    common = dict(keep=4, calib=calib_file, samples=8, seq_len=32, progress=False)
    moeshrink.prune(checkpoints["mixtral"], method, output=tmp_path / "one", **common)
    argv = [
        "prune",
        str(checkpoints["mixtral"]),
        "--method",
        method,
        "--keep",
        "4",
        "--calib",
        str(calib_file),
    ]
    _torchrun(argv + ["--samples", "8", "--seq-len", "32", "-o", str(tmp_path / "two"), "--quiet"], tmp_path)
    one, two = (
        json.loads((tmp_path / "one" / PLAN_FILENAME).read_text()),
        json.loads((tmp_path / "two" / PLAN_FILENAME).read_text()),
    )
    assert (
        two["calibration"]["processes"] == 2 and one["calibration"]["sha256"] == two["calibration"]["sha256"]
    )
    assert [[e["sources"] for e in lp["experts"]] for lp in one["layers"]] == [
        [e["sources"] for e in lp["experts"]] for lp in two["layers"]
    ]
    a, b = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:  # merged weights and least-squares re-fits see the same tokens, summed in another order
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_two_processes_match_one_for_stun_with_owl_on_all_linear_layers(checkpoints, calib_file, tmp_path):
    """Statistics for OWL's outliers and Wanda's norms of attention/dense layers are all-reduced too."""
    common = dict(calib=calib_file, samples=8, seq_len=32, progress=False)
    moeshrink.prune(
        checkpoints["qwen2_moe"],
        "stun",
        ratio=0.25,
        total_sparsity=0.5,
        sparsity_method="owl",
        sparsity_scope="all",
        output=tmp_path / "one",
        **common,
    )
    argv = ["prune", str(checkpoints["qwen2_moe"]), "--method", "stun", "--expert-ratio", "0.25"]
    argv += ["--total-sparsity", "0.5", "--sparsity-method", "owl", "--sparsity-scope", "all"]
    argv += [
        "--calib",
        str(calib_file),
        "--samples",
        "8",
        "--seq-len",
        "32",
        "-o",
        str(tmp_path / "two"),
        "--quiet",
    ]
    _torchrun(argv, tmp_path)
    one, two = (json.loads((tmp_path / d / PLAN_FILENAME).read_text()) for d in ("one", "two"))
    assert [lp["sparsity"]["sparsity"] for lp in one["layers"]] == pytest.approx(
        [lp["sparsity"]["sparsity"] for lp in two["layers"]], abs=1e-9
    )
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), key  # the same weights were zeroed
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
