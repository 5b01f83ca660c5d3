"""The ``moeshrink`` command: inspect, prune (flags and recipe), apply; errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moeshrink.cli import main
from moeshrink.plan import PLAN_FILENAME, ModelPlan


def test_inspect_reports_family_experts_and_bytes(checkpoints, capsys):
    assert main(["inspect", str(checkpoints["qwen2_moe"])]) == 0
    text = capsys.readouterr().out
    assert (
        "qwen2_moe" in text and "experts per MoE layer   8" in text and "shared experts          yes" in text
    )
    assert main(["inspect", str(checkpoints["deepseek_v3"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layers"] == [1, 2] and info["experts_per_layer"] == [8, 8] and info["top_k"] == 2
    assert 0 < info["expert_parameters"] < info["parameters"] and info["bytes"] == 4 * info["parameters"]


def test_prune_with_flags(checkpoints, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "prune",
        str(checkpoints["olmoe"]),
        "--method",
        "reap",
        "--ratio",
        "0.5",
        "--calib",
        str(calib_file),
    ]
    argv += ["-o", str(out), "--samples", "4", "--seq-len", "32", "--quiet"]
    assert main(argv) == 0
    assert "experts per layer 8 -> 4" in capsys.readouterr().out
    plan = ModelPlan.load(out / PLAN_FILENAME)
    assert plan.method == "reap" and plan.budget == {"keep": 4, "ratio": 0.5}
    assert plan.calibration["samples"] == 4 and len(plan.calibration["sha256"]) == 64


def test_prune_with_a_recipe_and_overrides(checkpoints, calib_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {checkpoints['mixtral']}\noutput: {tmp_path / 'out'}\ncalib: [{calib_file}]\n"
        "samples: 4\nseq_len: 32\nsteps:\n  - experts: {method: ean, keep: 6}\n  - top_k: 1\n"
    )
    assert main(["prune", "--recipe", str(recipe), "--quiet", "--seed", "5"]) == 0
    plan = ModelPlan.load(tmp_path / "out" / PLAN_FILENAME)
    assert (plan.method, plan.budget, plan.top_k, plan.calibration["seed"]) == ("ean", {"keep": 6}, 1, 5)


def test_bad_recipe_names_the_field(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: x\nstepz: []\n")
    assert main(["prune", "--recipe", str(recipe)]) == 2
    assert "stepz" in capsys.readouterr().err


@pytest.fixture
def random_plan(checkpoints, tmp_path):
    """A mixtral checkpoint pruned at random to 4 experts by the CLI; returns its output directory."""
    first = tmp_path / "first"
    argv = [
        "prune",
        str(checkpoints["mixtral"]),
        "--method",
        "random",
        "--keep",
        "4",
        "-o",
        str(first),
        "--quiet",
    ]
    assert main(argv) == 0
    return first


def test_apply_reproduces_a_plan(checkpoints, random_plan, tmp_path):
    argv = [
        "apply",
        str(checkpoints["mixtral"]),
        "--plan",
        str(random_plan / PLAN_FILENAME),
        "-o",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 0
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (
        random_plan / "model.safetensors"
    ).read_bytes()


def test_apply_refuses_another_checkpoint(checkpoints, random_plan, tmp_path, capsys):
    argv = [
        "apply",
        str(checkpoints["qwen3_moe"]),
        "--plan",
        str(random_plan / PLAN_FILENAME),
        "-o",
        str(tmp_path / "x"),
    ]
    assert main(argv) == 2
    assert "not the checkpoint this plan was made from" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["prune", "MISSING", "--method", "frequency", "--keep", "2"]])
def test_errors_print_one_line_and_exit_2(argv, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moeshrink", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("moeshrink: error: model directory not found")
    assert "Traceback" not in proc.stderr
