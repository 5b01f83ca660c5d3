"""Prune, then quantize (issue #15, item 4): the quantize step hands the finished output to
llm-compressor's ``oneshot`` and writes one compressed-tensors checkpoint.

What is refused is checked in any environment (before any work, one line, nothing written). The
tests marked ``quantize`` run llm-compressor itself on tiny mixtral, qwen3_moe and deepseek_v3 (all
three run on CPU) and need the ``quantize`` extra: ``make test-quant`` runs them in ``.venv-quant``;
the default ``make test`` skips them where llmcompressor is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import moeshrink
from moeshrink.arch import get_adapter
from moeshrink.cli import main
from moeshrink.errors import MoeShrinkError
from moeshrink.extras import has_module
from moeshrink.io.checkpoint import load_model
from moeshrink.job import Job
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.quant.oneshot import SCHEMES
from moeshrink.testbed.ctensors import write_compressed_tensors
from moeshrink.testbed.tiny import build_tiny_model

HAS_LLMCOMPRESSOR = has_module("llmcompressor")
needs_llmcompressor = pytest.mark.skipif(
    not HAS_LLMCOMPRESSOR, reason="llmcompressor is the quantize extra: make test-quant"
)

# Tiny models whose every quantized weight has a multiple of 128 inputs (W4A16's group size), and
# DeepSeek with as many key/value heads as heads (its real configs; llm-compressor's calibration runs
# the eager attention, which otherwise repeats MLA's keys).
SHAPES = {
    "mixtral": dict(hidden_size=128, intermediate_size=128),
    "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=128, head_dim=32),
    "deepseek_v3": dict(
        hidden_size=128,
        intermediate_size=128,
        moe_intermediate_size=128,
        num_key_value_heads=4,
        kv_lora_rank=128,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=32,
    ),
}
EXPERT_COUNT_KEY = {
    "mixtral": "num_local_experts",
    "qwen3_moe": "num_experts",
    "deepseek_v3": "n_routed_experts",
}
# compressed-tensors format and the expert weight tensor each scheme writes
FORMAT = {"FP8_DYNAMIC": "float-quantized", "W8A8": "int-quantized", "W4A16": "pack-quantized"}
STORED = {"FP8_DYNAMIC": "weight", "W8A8": "weight", "W4A16": "weight_packed"}
# Relative Frobenius error of a dequantized expert weight against the pruned one (int4 groups of 128:
# about 0.1 on Gaussian weights; float8: about 0.03; int8: under 0.01).
WEIGHT_ERROR = {"FP8_DYNAMIC": 0.06, "W8A8": 0.03, "W4A16": 0.2}


@pytest.fixture(scope="module")
def shaped(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize")
    return {
        family: build_tiny_model(family, root / family, seed=1, dtype=torch.bfloat16, **shape)
        for family, shape in SHAPES.items()
    }


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _assert_refused(code: int, err: str, out: Path, *words: str) -> None:
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists()


# ---------------------------------------------------------------- refused before any work (any venv)


def test_an_unsupported_scheme_lists_the_supported_ones(checkpoints, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    model = str(checkpoints["mixtral"])
    code, err = _cli(
        capsys, "prune", model, "--method", "frequency", "--keep", "4", "--calib", str(calib_file),
        "-o", str(out), "--quantize", "NVFP4",
    )  # fmt: skip
    _assert_refused(code, err, out, "NVFP4", *SCHEMES)


def test_without_the_extra_the_error_says_what_to_install(checkpoints, calib_file, tmp_path):
    """llmcompressor made unimportable (a None entry in sys.modules), as in a core-only install."""
    script = (
        "import sys\nsys.modules['llmcompressor'] = None\nfrom moeshrink.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["prune", str(checkpoints["qwen3_moe"]), "--method", "frequency", "--keep", "4"]
    argv += ["--calib", str(calib_file), "-o", "out", "--quantize", "FP8_DYNAMIC"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    _assert_refused(
        proc.returncode, proc.stderr.strip(), tmp_path / "out", "pip install 'moeshrink[quantize]'"
    )


def test_a_group_that_does_not_divide_a_weight_is_refused(checkpoints, calib_file, tmp_path, capsys):
    """The tests' usual tiny mixtral has 64 hidden units: W4A16's groups of 128 do not fit."""
    out = tmp_path / "out"
    code, err = _cli(
        capsys, "prune", str(checkpoints["mixtral"]), "--method", "frequency", "--keep", "4",
        "--calib", str(calib_file), "-o", str(out), "--quantize", "W4A16",
    )  # fmt: skip
    _assert_refused(code, err, out, "groups of 128", "64 inputs", "FP8_DYNAMIC")


@pytest.mark.parametrize(
    "case, words",
    [
        ("global", ["--global-budget"]),
        ("quantized input", ["quantized already", "compressed-tensors"]),
        ("not last", ["quantize step last"]),
        ("no calibration", ["--quantize W8A8", "--calib"]),
    ],
)
def test_what_a_quantize_step_cannot_follow_is_refused(case, words, shaped, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    model = shaped["qwen3_moe"]
    argv = ["prune", str(model), "-o", str(out)]
    prune = ["--method", "frequency", "--keep", "4", "--calib", str(calib_file)]
    if case == "global":
        argv += [*prune, "--global-budget", "--quantize", "FP8_DYNAMIC"]
    elif case == "quantized input":
        ct = write_compressed_tensors(model, tmp_path / "ct", "FP8_DYNAMIC")
        argv = ["prune", str(ct), "-o", str(out), *prune, "--quantize", "FP8_DYNAMIC"]
    elif case == "not last":
        recipe = tmp_path / "recipe.yaml"
        steps = [{"experts": {"method": "frequency", "keep": 4}}, {"quantize": {"scheme": "FP8_DYNAMIC"}}]
        steps.append({"top_k": 1})
        recipe.write_text(yaml.safe_dump({"calib": [str(calib_file)], "steps": steps}))
        argv += ["--recipe", str(recipe)]
    else:  # method none keeps every expert and needs no text; GPTQ does
        argv += ["--method", "none", "--quantize", "W8A8"]
    code, err = _cli(capsys, *argv)
    _assert_refused(code, err, out, *words)


def test_the_shorthand_puts_the_quantize_step_last():
    job = Job.build(model="m", method="reap", keep=4, quantize="W4A16", sparsity=0.5, steps=[{"top_k": 1}])
    assert [s.kind for s in job.steps] == ["experts", "top_k", "sparsify", "quantize"]
    assert job.step_of("quantize").scheme == "W4A16"


def test_the_python_api_refuses_a_quantize_step_without_an_output(shaped, calib_file):
    with pytest.raises(MoeShrinkError, match="output directory"):
        moeshrink.prune(str(shaped["mixtral"]), "frequency", keep=4, calib=calib_file, quantize="FP8_DYNAMIC")


# ---------------------------------------------------------------- llm-compressor (make test-quant)


def _stored(out: Path) -> dict[str, tuple[str, list[int]]]:
    found = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                found[key] = (s.get_dtype(), s.get_shape())
    return found


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.quantize
@needs_llmcompressor
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", list(SHAPES))
def test_prune_then_quantize_writes_one_compressed_tensors_checkpoint(
    family, scheme, shaped, calib_file, tmp_path
):
    out = tmp_path / "out"
    result = moeshrink.prune(
        str(shaped[family]), "frequency", keep=4, calib=calib_file, samples=8, seq_len=32, output=out,
        quantize=scheme, progress=False,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == FORMAT[scheme]
    assert quant["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert config[EXPERT_COUNT_KEY[family]] == 4
    moe_layers = [lp.layer for lp in result.plan.layers]
    routers = [name for name in quant["ignore"] if name.endswith(".gate")]
    assert "lm_head" in quant["ignore"] and len(routers) == len(moe_layers)

    # every kept expert's projections stored quantized, under the family's on-disk names, and no more
    stored = _stored(out)
    names = ("w1", "w2", "w3") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    for layer in moe_layers:
        prefix = f"model.layers.{layer}.{block}.experts"
        experts = {k.split(".")[5] for k in stored if k.startswith(prefix + ".")}
        assert experts == {"0", "1", "2", "3"}
        for e in range(4):
            for n in names:
                dtype, _ = stored[f"{prefix}.{e}.{n}.{STORED[scheme]}"]
                assert dtype == {"FP8_DYNAMIC": "F8_E4M3", "W8A8": "I8", "W4A16": "I32"}[scheme]
                assert f"{prefix}.{e}.{n}.weight_scale" in stored
    assert (out / "recipe.yaml").is_file() and not (out / ".quantized").exists()

    # moeshrink's loader reads it back: the pruned model, each expert weight within the scheme's error
    loaded = load_model(out).model
    adapter = get_adapter(loaded.config)
    pruned = {m.index: m for m in adapter.moe_layers(result.model)}
    for layer in adapter.moe_layers(loaded):
        assert layer.num_experts == 4
        for name, param in layer.experts.named_parameters():
            reference = dict(pruned[layer.index].experts.named_parameters())[name]
            assert _relative_error(param, reference) < WEIGHT_ERROR[scheme], (layer.index, name)
    ids = torch.randint(1, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()

    # and transformers (with compressed-tensors, decompressing: CPU kernels run FP8 activations
    # quantized) loads it to the same weights, bit for bit; transformers 5.17 cannot build W8A8's int8
    # experts (it concatenates the stored int8 weights into its fused experts and finds none:
    # "Concatenate on tensors destined for ...gate_up_proj"), which moeshrink's loader reads
    if scheme != "W8A8":
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        plain, info = AutoModelForCausalLM.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(run_compressed=False), output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        theirs = plain.state_dict()
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(theirs[name], tensor), name

    # the plan and the card record both steps
    plan = ModelPlan.load(out / PLAN_FILENAME)
    assert plan.method == "frequency" and plan.num_experts_after == [4] * len(moe_layers)
    q = plan.quantization
    assert q["scheme"] == scheme and q["format"] == FORMAT[scheme] and "lm_head" in q["ignore"]
    assert q["versions"]["llmcompressor"] and q["versions"]["compressed-tensors"]
    assert (q["calibration"] is not None) == SCHEMES[scheme].calibrates
    card = (out / "README.md").read_text()
    assert "frequency" in card and "## Quantization (after pruning)" in card and f"**{scheme}**" in card


@pytest.mark.quantize
@needs_llmcompressor
def test_the_quantized_output_is_verified_in_a_fresh_process(shaped, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESHRINK_VERIFY", "1")
    out = tmp_path / "out"
    result = moeshrink.prune(
        str(shaped["qwen3_moe"]), "none", calib=calib_file, samples=8, seq_len=32, output=out,
        quantize="W4A16", progress=False,
    )  # fmt: skip
    check = result.plan.quantization["verification"]["transformers"]
    assert check["status"] == "pass" and "compressed-tensors" in check["detail"]
    assert result.plan.verification["transformers"]["status"] == "pass"  # the export before quantizing
    assert "in a fresh process: transformers: pass" in (out / "README.md").read_text()


@pytest.mark.quantize
@needs_llmcompressor
def test_a_streamed_job_is_quantized_too(shaped, calib_file, tmp_path):
    """Streaming writes the pruned layers one at a time; the quantize step then loads the pruned output."""
    out = tmp_path / "out"
    moeshrink.prune(
        str(shaped["deepseek_v3"]), "frequency", keep=4, calib=calib_file, samples=8, seq_len=32, output=out,
        stream=True, quantize="FP8_DYNAMIC", progress=False,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized" and config["n_routed_experts"] == 4
    assert ModelPlan.load(out / PLAN_FILENAME).quantization["scheme"] == "FP8_DYNAMIC"
    loaded = load_model(out).model
    assert [layer.num_experts for layer in get_adapter(loaded.config).moe_layers(loaded)] == [4, 4]
