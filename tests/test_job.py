"""The job: one description from the API, the command line and recipes; checked whole before any
weight is read; steps run in the order written."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from moeshrink.cli import main
from moeshrink.errors import MoeShrinkError
from moeshrink.job import Job, load_recipe

KW = dict(samples=4, seq_len=32, progress=False)


def test_shorthand_and_steps_describe_the_same_job():
    flat = Job.build(method="reap", keep=6, top_k=1, sparsity=0.5)
    steps = Job.build(
        steps=[{"experts": {"method": "reap", "keep": 6}}, {"top_k": 1}, {"sparsify": {"sparsity": 0.5}}]
    )
    assert flat.steps == steps.steps
    assert [s.kind for s in flat.steps] == ["experts", "top_k", "sparsify"]


def test_flags_override_the_recipe_steps(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - top_k: 1\n  - experts: {method: ean, keep: 6, options: {}}\n")
    job = load_recipe(recipe).updated(ratio=0.5, top_k=2, sparsity=0.3)
    assert [s.kind for s in job.steps] == ["top_k", "experts", "sparsify"]  # order kept, sparsify added
    experts = job.step_of("experts")
    assert (experts.method, experts.keep, experts.ratio) == ("ean", None, 0.5)
    assert job.step_of("top_k") == 2


def test_one_step_of_each_kind(checkpoints, calib_file):
    job = Job.build(
        model=str(checkpoints["mixtral"]),
        calib=calib_file,
        steps=[
            {"experts": {"method": "reap", "keep": 4}},
            {"sparsify": {"sparsity": 0.3}},
            {"sparsify": {"nm": "2:4"}},
        ],
    )
    with pytest.raises(MoeShrinkError, match="only one 'sparsify' step per job"):
        job.check()


def test_top_k_zero_is_refused():
    with pytest.raises(MoeShrinkError, match="greater than or equal to 1"):
        Job.build(method="reap", keep=4, top_k=0)


def test_steps_run_in_the_order_written(checkpoints, calib_file):
    """Frequency's scores are the top-k selection counts: with the top-k step first they count one
    expert per token, after it two."""
    common = dict(model=str(checkpoints["mixtral"]), calib=calib_file, **KW)
    experts = {"experts": {"method": "frequency", "keep": 4}}
    first = Job.build(steps=[{"top_k": 1}, experts], **common).run()
    after = Job.build(steps=[experts, {"top_k": 1}], **common).run()
    tokens = KW["samples"] * KW["seq_len"]
    assert [sum(lp.scores) for lp in first.plan.layers] == [tokens] * len(first.plan.layers)
    assert [sum(lp.scores) for lp in after.plan.layers] == [2 * tokens] * len(after.plan.layers)
    assert first.plan.top_k == after.plan.top_k == 1


def test_checked_before_any_weight_is_read(checkpoints, calib_file, tmp_path):
    """check() validates without loading: a NaN weight (found only when weights are read) passes it,
    while every bad input is refused by it."""
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if "layers.1." in k and "experts.0" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    good = dict(model=str(model), method="reap", keep=4, calib=calib_file, output=str(tmp_path / "o"), **KW)
    Job.build(**good).check()
    with pytest.raises(MoeShrinkError, match="contains NaN"):
        Job.build(**good).run()
    bad = [
        ({"keep": 9}, "removes nothing"),
        ({"method_options": {"nope": 1}}, "nope"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"calib": tmp_path / "missing.txt"}, "calibration file not found"),
        ({"output": str(model)}, "is the input checkpoint"),
        ({"device": "cuda:7"}, "no CUDA device"),
    ]
    for change, message in bad:
        with pytest.raises(MoeShrinkError, match=message):
            Job.build(**(good | change)).check()
    assert not (tmp_path / "o").exists()


def test_global_budget_after_another_step_is_refused_when_streaming(
    checkpoints, calib_file, tmp_path, capsys
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {checkpoints['mixtral']}\ncalib: [{calib_file}]\nsamples: 4\nseq_len: 32\n"
        "steps:\n  - top_k: 1\n  - experts: {method: frequency, keep: 4, global_budget: true}\n"
    )
    assert main(["prune", "--recipe", str(recipe), "--stream", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "make the experts step the first step" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
