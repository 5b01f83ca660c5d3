"""Merging, reconstruction, sparsity and recovery on quantized inputs (issue #15, item 3): tiny mixtral
(block-FP8, one expert left unquantized), qwen3_moe (compressed-tensors FP8_DYNAMIC and W4A16_ASYM) and
deepseek_v3 (compressed-tensors W4A16) written here; the changed experts are written re-quantized in the
input's scheme and layout, every other tensor is the input's bytes, the re-quantization error is in the
plan and the card, the output reloads; zeros from sparsity stay exact; what cannot be re-quantized is
refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.quant import BlockFP8Scheme, CompressedTensorsScheme, weight_group
from moeshrink.quant.ctensors import CompressedTensorsCheckpoint, QuantizedModule
from moeshrink.quant.ctensors import dequantize as ct_dequantize
from moeshrink.quant.ctensors import quantize as ct_quantize
from moeshrink.quant.fp8 import BlockFP8Checkpoint
from moeshrink.quant.fp8 import dequantize as fp8_dequantize
from moeshrink.quant.fp8 import quantize as fp8_quantize
from moeshrink.quant.requant import requantize
from moeshrink.quant.source import EXPERT_KEY, copied_source
from moeshrink.testbed.ctensors import quantization_config, write_compressed_tensors
from moeshrink.testbed.fp8 import write_block_fp8
from moeshrink.testbed.tiny import build_tiny_model

from .conftest import tree_digest
from .test_quantized import _logits, _prune, _same_bytes, _tensors

UNQUANTIZED = "model.layers.1.block_sparse_moe.experts.3"
# name -> (family, writer, preset)
LAYOUTS = {
    "mixtral-fp8block": ("mixtral", "fp8", None),
    "qwen3_moe-fp8_dynamic": ("qwen3_moe", "ct", "FP8_DYNAMIC"),
    "deepseek_v3-w4a16": ("deepseek_v3", "ct", "W4A16"),
    "qwen3_moe-w4a16_asym": ("qwen3_moe", "ct", "W4A16_ASYM"),
    "mixtral-fp8_static": ("mixtral", "ct", "FP8"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny bfloat16 checkpoints and their quantized copies."""
    root = tmp_path_factory.mktemp("requant")
    out: dict[str, Path] = {}
    for name, (family, writer, preset) in LAYOUTS.items():
        dense = root / f"{family}-dense"
        if not dense.exists():
            build_tiny_model(family, dense, seed=1, dtype=torch.bfloat16)
        out[f"{family}-dense"] = dense
        if writer == "fp8":
            out[name] = write_block_fp8(dense, root / name, (16, 16), not_converted=[UNQUANTIZED])
        else:
            out[name] = write_compressed_tensors(dense, root / name, preset)
    return out


def _quant_error(dense: Path, quantized: Path) -> float:
    """The largest relative Frobenius error of the input's own quantization over its routed experts."""
    model, dq = load_model(dense, "float32").model, load_model(quantized, "float32").model
    worst = 0.0
    for (name, a), (_, b) in zip(model.named_parameters(), dq.named_parameters(), strict=True):
        if ".experts." in name and "shared" not in name and a.ndim == 3:
            a, b = a.detach(), b.detach()
            for i in range(a.shape[0]):
                if not torch.equal(a[i], b[i]):
                    worst = max(worst, float((a[i] - b[i]).norm() / a[i].norm()))
    return worst


def _experts(state: dict[str, torch.Tensor], layer: int, index: int) -> dict[str, torch.Tensor]:
    """Tensors of one routed expert by their name after ``experts.N``."""
    out = {}
    for name, tensor in state.items():
        match = EXPERT_KEY.match(name)
        if match and f".layers.{layer}." in name and int(match["index"]) == index:
            out[match["tail"]] = tensor
    return out


@pytest.mark.parametrize("name", ["mixtral-fp8block", "qwen3_moe-fp8_dynamic", "deepseek_v3-w4a16"])
def test_merge_requantizes_in_the_same_scheme(name, models, calib_file, tmp_path):
    """M-SMoE (with its reconstruction, the default): each merged expert is written in its first source's
    scheme (same tensor names, dtypes and shapes); a kept expert the job did not change is the input's
    bytes; the plan records each layer's error, at most 1.5x the input's own quantization error (the same
    round-to-nearest on weights of the same scale: re-quantizing costs what quantizing did); the output
    reloads and runs."""
    family = LAYOUTS[name][0]
    out = tmp_path / "out"
    digest = tree_digest(models[name])
    result = _prune(models[name], calib_file, out, method="msmoe")
    plan = ModelPlan.load(out / PLAN_FILENAME)
    before, after = _tensors(models[name]), _tensors(out)
    merged = copies = 0
    for lp in plan.layers:
        for new, expert in enumerate(lp.experts):
            written = _experts(after, lp.layer, new)
            source = copied_source(expert)
            if source is not None:
                copies += 1
                kept = _experts(before, lp.layer, source)
                assert sorted(written) == sorted(kept)
                assert all(_same_bytes(written[t], kept[t]) for t in kept if t not in lp.experts[new].refit)
                continue
            merged += 1
            first = [s for s, w in zip(expert.sources, expert.weights, strict=True) if w][0]
            layout = _experts(before, lp.layer, first)
            assert {t: (v.dtype, v.shape) for t, v in written.items()} == {
                t: (v.dtype, v.shape) for t, v in layout.items()
            }
        assert plan.source["quantization"]["requantization"]["layers"][str(lp.layer)]["tensors"] > 0
    assert merged > 0 and copies > 0
    summary = result.plan.source["quantization"]["requantization"]
    bound = 1.5 * _quant_error(models[f"{family}-dense"], models[name])
    assert 0 < summary["max_relative_error"] <= bound, (summary, bound)
    assert summary == plan.source["quantization"]["requantization"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert plan.source["quantization"]["tensor_bytes_after"] == index["metadata"]["total_size"]
    assert "re-quantized in the same scheme" in (out / "README.md").read_text()
    reloaded = load_model(out, "float32").model
    assert torch.isfinite(_logits(reloaded)).all()
    assert tree_digest(models[name]) == digest


def test_merged_block_fp8_is_read_by_transformers(models, calib_file, tmp_path):
    """transformers (which dequantizes block-FP8 on a CPU) reads a merged qwen3_moe block-FP8 output as
    moeshrink's loader does."""
    dense = models["qwen3_moe-dense"]
    model = write_block_fp8(dense, tmp_path / "fp8", (16, 16), style="qwen3")
    out = tmp_path / "out"
    _prune(model, calib_file, out, method="hcsmoe")
    from transformers import AutoModelForCausalLM

    ours = _logits(load_model(out, "bfloat16").model.float())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).float()
    assert (_logits(hf) - ours).abs().max() <= 1e-5


def test_unquantized_expert_stays_unquantized(models, calib_file, tmp_path):
    """An expert left unquantized in the input (modules_to_not_convert) is written unquantized where a
    new expert copies it, and the ignore list names its new number."""
    out = tmp_path / "out"
    _prune(models["mixtral-fp8block"], calib_file, out, method="msmoe")
    plan = ModelPlan.load(out / PLAN_FILENAME)
    listed = json.loads((out / "config.json").read_text())["quantization_config"].get(
        "modules_to_not_convert", []
    )
    after = _tensors(out)
    layer = next(lp for lp in plan.layers if lp.layer == 1)
    for new, expert in enumerate(layer.experts):
        unquantized = all(s == 3 for s, w in zip(expert.sources, expert.weights, strict=True) if w)
        assert (f"model.layers.1.block_sparse_moe.experts.{new}.w1" in listed) == unquantized
        dtype = after[f"model.layers.1.block_sparse_moe.experts.{new}.w1.weight"].dtype
        assert (dtype == torch.bfloat16) == unquantized


@pytest.mark.parametrize("name", ["mixtral-fp8block", "qwen3_moe-w4a16_asym", "deepseek_v3-w4a16"])
def test_sparsity_keeps_its_zeros_and_the_scales(name, models, calib_file, tmp_path):
    """Wanda 2:4 inside the experts: each sparsified tensor keeps the input's scales (and zero points),
    only the zeroed codes change, so the written weight is exactly the computed one (error 0) and every
    group of 4 inputs has at least 2 exact zeros after dequantization."""
    out = tmp_path / "out"
    result = _prune(models[name], calib_file, out, nm="2:4")
    summary = result.plan.source["quantization"]["requantization"]
    assert summary["tensors"] == summary["kept_scales"] > 0 and summary["max_relative_error"] == 0.0
    reloaded = load_model(out, "float32").model
    checked = 0
    for pname, param in reloaded.named_parameters():
        if ".experts." in pname and "shared" not in pname and param.ndim == 3:
            zeros = (param.reshape(-1, 4) == 0).sum(dim=1)
            assert bool((zeros >= 2).all()), pname
            checked += 1
    assert checked > 0
    before, after = _tensors(models[name]), _tensors(out)
    scale = next(k for k in after if ".experts.0." in k and k.endswith(("weight_scale", "weight_scale_inv")))
    plan = result.plan
    lp = next(lp for lp in plan.layers if f".layers.{lp.layer}." in scale)
    source_name = scale.replace(".experts.0.", f".experts.{lp.experts[0].sources[0]}.")
    assert _same_bytes(after[scale], before[source_name])


def test_recovery_requantizes_the_refit(models, calib_file, tmp_path):
    """--recover on a quantized input: the re-fitted down projections are re-quantized, the rest copied."""
    out = tmp_path / "out"
    result = _prune(models["qwen3_moe-fp8_dynamic"], calib_file, out, recover=True)
    summary = result.plan.source["quantization"]["requantization"]
    refit = sum(len(e.refit) for lp in result.plan.layers for e in lp.experts if e.refit)
    assert refit > 0 and summary["tensors"] > 0
    assert torch.isfinite(_logits(load_model(out, "float32").model)).all()


def test_streamed_and_resident_write_the_same(models, calib_file, tmp_path):
    """The re-quantized output is the same, file for file, streamed (changed tensors spilled) or resident."""
    model = models["deepseek_v3-w4a16"]
    _prune(model, calib_file, tmp_path / "a", method="msmoe", stream=True)
    _prune(model, calib_file, tmp_path / "b", method="msmoe", stream=False)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(_same_bytes(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".moeshrink-requant-*"))  # the spill is gone


@pytest.mark.parametrize(
    "fields",
    [{"method": "msmoe"}, {"nm": "2:4"}, {"recover": True}, {"method": "stun"}],
    ids=["merge", "sparsity", "recover", "stun-average"],
)
def test_static_activation_scales_are_refused(fields, models, calib_file, tmp_path):
    """FP8 with static input scales: changed experts would need new activation scales (one line, nothing
    written); pruning only is still fine."""
    with pytest.raises(MoeShrinkError, match="static activation scales") as err:
        _prune(models["mixtral-fp8_static"], calib_file, tmp_path / "out", **fields)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_activation_ordering_is_refused(models, calib_file, tmp_path):
    """W4A16 with GPTQ's activation ordering (weight_g_idx): refused for a merge, in one line."""
    model = tmp_path / "gidx"
    shutil.copytree(models["deepseek_v3-w4a16"], model)
    state = load_file(model / "model.safetensors")
    for key in [k for k in state if k.endswith(".weight_packed")]:
        cols = int(state[key.replace("weight_packed", "weight_shape")][1])
        state[key.replace("weight_packed", "weight_g_idx")] = torch.arange(cols, dtype=torch.int32) // 16
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeShrinkError, match="activation ordering") as err:
        _prune(model, calib_file, tmp_path / "out", method="msmoe")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_search_is_refused(models, tmp_path):
    """EEP's search (a merge search) is not run on quantized checkpoints: one line."""
    from moeshrink.quant import refuse_quantized

    with pytest.raises(MoeShrinkError, match="'moeshrink search' does not work on quantized"):
        refuse_quantized(models["mixtral-fp8block"], "moeshrink search")


PRESETS = ["FP8_DYNAMIC", "FP8", "FP8_BLOCK", "W8A8", "W4A16", "W4A16_ASYM"]


@pytest.mark.parametrize("preset", [*PRESETS, "block-fp8", "block-fp8-bf16"])
def test_requantize_each_scheme(preset):
    """One module per scheme: a changed weight comes back in the stored layout (names, dtypes, shapes)
    with its measured error; a weight with only entries zeroed keeps the scales and is written exactly."""
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    if preset.startswith("block-fp8"):
        q, scale = fp8_quantize(
            weight, (16, 16), torch.bfloat16 if preset.endswith("bf16") else torch.float32
        )
        stored = {"weight": q, "weight_scale_inv": scale}
        checkpoint = BlockFP8Checkpoint(BlockFP8Scheme(block=(16, 16), config={}), scales={}, tensors={})

        def dq(t: dict[str, torch.Tensor]) -> torch.Tensor:
            return fp8_dequantize(t["weight"], t["weight_scale_inv"], (16, 16), torch.bfloat16)

    else:
        config = quantization_config(preset, [], 16, (16, 16))
        group = weight_group(None, "", "group_0", config["config_groups"]["group_0"], config["format"])
        stored = ct_quantize(weight, group)
        scheme = CompressedTensorsScheme(groups={"group_0": group}, config=config)
        checkpoint = CompressedTensorsCheckpoint(
            scheme, {"m": QuantizedModule("m", group, 48, 64)}, tensors={}
        )

        def dq(t: dict[str, torch.Tensor]) -> torch.Tensor:
            w = t.get("weight_packed", t.get("weight"))
            return ct_dequantize(group, w, t["weight_scale"], t.get("weight_zero_point"), shape=(48, 64))

    source = dq(stored).to(torch.bfloat16)
    changed = (source * 0.7 + 0.01).to(torch.bfloat16)
    done = requantize(checkpoint, "m", stored, changed, torch.bfloat16)
    assert {k: (v.dtype, v.shape) for k, v in done.tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in stored.items()
    }
    measured = float((dq(done.tensors).float() - changed.float()).norm() / changed.float().norm())
    assert done.error == pytest.approx(measured, rel=1e-3) and 0 < done.error < 0.15 and not done.kept_scales
    mask = torch.rand(48, 64, generator=torch.Generator().manual_seed(1)) < 0.5
    sparse = source.masked_fill(mask, 0)
    done = requantize(checkpoint, "m", stored, sparse, torch.bfloat16)
    assert done.kept_scales and done.error == 0.0
    assert torch.equal(dq(done.tensors).to(torch.bfloat16), sparse)
    for name in stored:
        if "scale" in name or "zero" in name:
            assert _same_bytes(done.tensors[name], stored[name])


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "uncurl"},
        {"method": "stun"},  # average mode, the default
        {"method": "frequency", "sparsity": 0.5, "sparsity_method": "owl", "stream": False},
        {"method": "frequency", "sparsity": 0.5, "sparsity_method": "magnitude"},
    ],
    ids=["uncurl", "stun-average", "owl", "magnitude"],
)
def test_other_methods_requantize(fields, models, calib_file, tmp_path):
    """The other merging methods and sparsity methods on a W4A16 deepseek_v3: changed experts
    re-quantized (merges rounded, sparsity exact), the output reloads and runs."""
    out = tmp_path / "out"
    result = _prune(models["deepseek_v3-w4a16"], calib_file, out, **fields)
    summary = result.plan.source["quantization"]["requantization"]
    assert summary["tensors"] > 0
    if "sparsity" in fields:
        assert summary["kept_scales"] == summary["tensors"] and summary["max_relative_error"] == 0.0
    assert torch.isfinite(_logits(load_model(out, "float32").model)).all()


def test_global_budget_merge(models, calib_file, tmp_path):
    """A global budget (different expert counts per layer, which the dense export writes fused): the
    quantized output keeps per-expert tensors, the same streamed or resident."""
    model = models["mixtral-fp8block"]
    a = _prune(model, calib_file, tmp_path / "a", method="msmoe", global_budget=True, stream=True)
    _prune(model, calib_file, tmp_path / "b", method="msmoe", global_budget=True, stream=False)
    assert len(set(a.plan.num_experts_after)) > 1
    x, y = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert sorted(x) == sorted(y) and all(_same_bytes(x[k], y[k]) for k in x)
    assert torch.isfinite(_logits(load_model(tmp_path / "a", "float32").model)).all()
