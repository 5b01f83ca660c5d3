"""A job's verification with vLLM installed: the output loads in vLLM in a fresh process and matches
transformers; an output in the layout before 0.2 (a tensor file beside the weights) fails the check
with a message saying how to fix it. Needs vLLM (skipped without it)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("vllm")

import moeshrink  # noqa: E402
from moeshrink.plan import EXTRAS_DIR, LEGACY_REFIT_FILENAME, REFIT_FILENAME  # noqa: E402
from moeshrink.testbed.paths import corpus_dir  # noqa: E402
from moeshrink.testbed.paths import testbed_model_dir as testbed_dir  # noqa: E402
from moeshrink.verify import TOLERANCE, verify_checkpoint  # noqa: E402

KW = dict(keep=8, calib=corpus_dir() / "wiki" / "calib.jsonl", samples=8, seq_len=64, progress=False)


@pytest.mark.parametrize("method", ["reap", "msmoe", "reap+recover"])
def test_job_verifies_its_output_in_vllm(method, tmp_path):
    """REAP (a prune), M-SMoE with its defaults (a merge with re-fitted experts, whose tensors used
    to sit beside the weights and made vLLM refuse the folder) and REAP with the recover step (re-fitted
    router rows and down projections in the weights)."""
    out = tmp_path / method
    name, _, recover = method.partition("+")
    result = moeshrink.prune(testbed_dir(), name, output=out, verify=True, recover=bool(recover), **KW)
    checks = result.plan.verification
    assert checks["transformers"]["status"] == "pass", checks
    assert checks["vllm"]["status"] == "pass", checks
    assert checks["vllm"]["max_abs_diff"] <= TOLERANCE["vllm"]
    assert [f.name for f in out.glob("*.safetensors")] == ["model.safetensors"]
    if method == "msmoe":
        assert (out / REFIT_FILENAME).is_file()
        legacy = tmp_path / "legacy"
        shutil.copytree(out, legacy)
        (legacy / REFIT_FILENAME).rename(legacy / LEGACY_REFIT_FILENAME)
        (legacy / EXTRAS_DIR).rmdir()
        verification = verify_checkpoint(legacy)
        (failed,) = verification.failed
        assert failed.name == "vllm" and f"move it into {EXTRAS_DIR}/" in failed.detail


def test_verify_serving_records_vllm_throughput_in_plan_and_card(tmp_path, capsys):
    """``moeshrink verify OUT --original SRC --serving``: both measured in vLLM in one run; the plan
    and the model card carry the engine, the device and the ratios to the original."""
    from moeshrink.cli import main
    from moeshrink.plan import ModelPlan
    from moeshrink.testbed.tiny import build_tiny_model

    source = build_tiny_model("mixtral", tmp_path / "source", num_attention_heads=2, num_key_value_heads=2)
    out = tmp_path / "out"
    moeshrink.prune(source, "reap", output=out, **(KW | {"keep": 4}))
    assert (
        "## Serving cost" in (out / "README.md").read_text()
        and "Not measured" in (out / "README.md").read_text()
    )
    assert main(["verify", str(out), "--original", str(source), "--serving"]) == 0
    serving = ModelPlan.load(out / "moeshrink_plan.json").serving
    original, pruned = serving["rows"].values()
    assert serving["engine"]["name"] == "vLLM" and serving["engine"]["device"].startswith("CPU")
    assert original["ratios"]["weight_bytes"] == 1.0
    assert 0 < pruned["ratios"]["weight_bytes"] < 1  # 4 of 8 experts kept
    for row in (original, pruned):
        assert row["prefill_tokens_per_s"] > 0 and row["generation_tokens_per_s"] > 0
    card = (out / "README.md").read_text()
    assert f"Measured by vLLM {serving['engine']['version']}" in card and "Not measured" not in card
    assert card.count("## Serving cost") == 1
    assert "this checkpoint (out)" in capsys.readouterr().out
