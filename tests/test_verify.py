"""Verification of exported checkpoints in a fresh process (transformers here; vLLM in tests/vllm)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import moeshrink
from moeshrink.cli import main
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.verify import TOLERANCE, verify_before_commit, verify_checkpoint, vllm_available

KW = dict(samples=4, seq_len=32, progress=False)


@pytest.fixture(scope="module")
def verified(checkpoints, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("verified") / "out"
    result = moeshrink.prune(
        checkpoints["qwen3_moe"], "reap", keep=4, calib=calib_file, output=out, verify=True, **KW
    )
    return out, result


def test_prune_verifies_its_output_and_records_it(verified, checkpoints, calib_file):
    out, result = verified
    saved = ModelPlan.load(out / PLAN_FILENAME).verification
    assert saved == result.plan.verification
    check = saved["transformers"]
    assert check["status"] == "pass", check
    assert check["max_abs_diff"] <= TOLERANCE["transformers"]
    assert "from_pretrained in a fresh process" in check["detail"]
    if not vllm_available():
        assert saved["vllm"]["status"] == "skipped" and "not installed" in saved["vllm"]["detail"]
    card = (out / "README.md").read_text()
    assert "## Verification" in card and "| transformers | pass" in card
    # a card is meant to be published: metadata, names as given, no local paths
    assert card.startswith("---\n") and "library_name: transformers" in card and "- reap" in card
    assert str(checkpoints["qwen3_moe"]) not in card and str(calib_file) not in card
    assert "`qwen3_moe`" in card and calib_file.name in card


def test_a_changed_weight_fails_the_check(verified, tmp_path):
    out, _ = verified
    reference = load_model(out, "float32").model
    with torch.no_grad():
        reference.model.layers[0].mlp.experts.down_proj[0].mul_(3.0)
    verification = verify_checkpoint(out, reference, vllm=False)
    assert [c.name for c in verification.failed] == ["transformers"]
    assert verification.failed[0].max_abs_diff > TOLERANCE["transformers"]
    # as the last step of a job it refuses to commit, with the check named
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    plan = ModelPlan.load(copy / PLAN_FILENAME)
    hook = verify_before_commit(plan, lambda p: "card", reference, progress=False)
    with pytest.raises(MoeShrinkError, match="failed verification and was not written: transformers: fail"):
        hook(copy)


def test_verify_command(verified, checkpoints, tmp_path, capsys):
    out, _ = verified
    assert main(["verify", str(out), "--original", str(checkpoints["qwen3_moe"]), "--no-vllm"]) == 0
    assert "transformers: pass" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_missing_weights_fail_the_load_check(verified, tmp_path):
    out, _ = verified
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1  # a layer the weights do not have
    (broken / "config.json").write_text(json.dumps(config))
    verification = verify_checkpoint(broken, vllm=False)
    assert verification.failed and "missing keys" in verification.failed[0].detail


def test_per_layer_format_of_a_family_the_plugin_lacks_is_skipped_in_vllm(tmp_path):
    """The vLLM check skips (with the reason) rather than fails an output vLLM cannot serve yet."""
    from moeshrink.verify import check_vllm

    out = tmp_path / "phimoe-per-layer"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["MoeshrinkPhimoeForCausalLM"]}))
    check = check_vllm(out, [[1, 2, 3]], [[0.0, 0.0]])
    if vllm_available():
        assert check.status == "skipped" and "does not serve this family's per-layer format" in check.detail
    else:
        assert check.status == "skipped" and "not installed" in check.detail


def test_card_has_a_serving_section_that_a_measurement_replaces(verified, tmp_path):
    """Before a measurement the card says how to make one; ``record_serving`` puts the measured table
    (engine, device, ratios) into the plan and the card in place of that section, once."""
    from moeshrink.verify.serving import record_serving

    out, _ = verified
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    card = (copy / "README.md").read_text()
    assert "## Serving cost" in card and "--serving" in card
    ratios = {"weight_bytes": 0.5, "prefill_tokens_per_s": 1.1, "generation_tokens_per_s": 1.2}
    serving = {
        "engine": {"name": "vLLM", "version": "9.9.9", "device": "GPU (test)"},
        "machine": "x86_64 with 2 CPU cores",
        "settings": {"prompts": 2, "prompt_tokens": 8, "new_tokens": 4, "repeat": 1},
        "rows": {
            "this checkpoint (copy)": {
                "weight_bytes": 1000,
                "prefill_tokens_per_s": 10.0,
                "generation_tokens_per_s": 5.0,
                "load_1min": [0.5, 0.6],
                "ratios": ratios,
            }
        },
    }
    record_serving(copy, serving)
    assert ModelPlan.load(copy / PLAN_FILENAME).serving == serving
    updated = (copy / "README.md").read_text()
    assert updated.count("## Serving cost") == 1 and "Measured by vLLM 9.9.9 on GPU (test)" in updated
    assert "| this checkpoint (copy) |" in updated and "(0.50x)" in updated
    assert updated.split("<!-- moeshrink:serving -->")[0] == card.split("<!-- moeshrink:serving -->")[0]
    assert not list(copy.glob(".*.tmp-*"))  # replaced atomically, nothing left behind


@pytest.mark.skipif(vllm_available(), reason="checks the message shown when vLLM is missing")
def test_verify_serving_without_vllm_says_what_to_install(verified, capsys):
    out, _ = verified
    assert main(["verify", str(out), "--no-vllm", "--serving"]) == 2
    assert "moeshrink[vllm]" in capsys.readouterr().err


def test_root_cause_keeps_pydantics_reason():
    """vLLM validates its config with pydantic, whose reason is on a later line than the error's name."""
    import pydantic

    from moeshrink.verify import root_cause

    class Config(pydantic.BaseModel):
        dtype: str

        @pydantic.model_validator(mode="after")
        def check(self):
            raise ValueError(f"{self.dtype} is not supported for quantization method fp8")

    try:
        Config(dtype="torch.float32")
    except pydantic.ValidationError as e:
        stderr = f"Traceback (most recent call last):\n  ...\n{type(e).__module__}.ValidationError: {e}\n"
    assert root_cause(stderr) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for Config: "
        "torch.float32 is not supported for quantization method fp8"
    )
    assert root_cause("noise\nRuntimeError: boom\nsee root cause above\n") == "RuntimeError: boom"
