"""compressed-tensors checkpoints in (issue #15): tiny mixtral, qwen3_moe and deepseek_v3 written as
llm-compressor writes them (``moeshrink.testbed.ctensors``: FP8 per channel / per tensor with static
input scales / in blocks, INT8 W8A8, INT4 W4A16 packed into int32, symmetric and asymmetric), pruned;
the kept experts' bytes are the input's, the config's ignore list and per-module targets are
renumbered, the output reloads as the pruned model; what cannot be read or done is refused in one
line before any weight is read. The package's own compressors check the arithmetic and the files in
``tests/vllm/test_ctensors_package.py`` (the environment that has compressed-tensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeshrink
from moeshrink.arch import ADAPTERS
from moeshrink.cli import main
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_config, load_model
from moeshrink.io.streaming import ShardReader
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.quant import WeightGroup, read_quantization
from moeshrink.quant.ctensors import dequantize, pack_int32, unpack_int32
from moeshrink.quant.source import QuantizedLayers, open_quantized
from moeshrink.surgery import apply_model_plan
from moeshrink.testbed.ctensors import PRESETS, compress_weight, quantization_config, write_compressed_tensors
from moeshrink.testbed.tiny import build_tiny_model

from .conftest import assert_one_layer_at_a_time, broken_copy, tree_digest
from .test_quantized import _logits, _prune, assert_bit_exact

# name -> (family, preset, modules left unquantized and listed in ignore)
EXPERT = "model.layers.1.block_sparse_moe.experts.3"
LAYOUTS = {
    "mixtral-w4a16": ("mixtral", "W4A16", [f"{EXPERT}.w{i}" for i in (1, 2, 3)]),
    "qwen3_moe-fp8_dynamic": ("qwen3_moe", "FP8_DYNAMIC", []),
    "deepseek_v3-w8a8": ("deepseek_v3", "W8A8", []),
    "qwen3_moe-w4a16_asym": ("qwen3_moe", "W4A16_ASYM", []),
    "mixtral-fp8": ("mixtral", "FP8", []),
    "deepseek_v3-fp8_block": ("deepseek_v3", "FP8_BLOCK", []),
}


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict[str, Path]:
    """Tiny bfloat16 checkpoints written as compressed-tensors."""
    root = tmp_path_factory.mktemp("ct")
    dense = {}
    out = {}
    for name, (family, preset, skip) in LAYOUTS.items():
        if family not in dense:
            dense[family] = build_tiny_model(family, root / f"{family}-dense", seed=1, dtype=torch.bfloat16)
        out[name] = write_compressed_tensors(dense[family], root / name, preset, not_converted=skip)
    out |= {f"{family}-dense": path for family, path in dense.items()}
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_prune_keeps_the_experts_bytes(name, ct, calib_file, tmp_path):
    family, preset, _ = LAYOUTS[name]
    out = tmp_path / "out"
    source_digest = tree_digest(ct[name])
    result = _prune(ct[name], calib_file, out)
    plan = ModelPlan.load(out / PLAN_FILENAME)
    assert all(len(lp.experts) == 4 and all(e.is_plain_copy for e in lp.experts) for lp in plan.layers)
    assert_bit_exact(ct[name], out, plan)
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == PRESETS[preset]["format"]
    assert config["dtype"] == "bfloat16"
    recorded = result.plan.source["quantization"]
    assert (
        recorded["scheme"] == "compressed-tensors"
        and recorded["groups"]["group_0"]["format"] == quant["format"]
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert recorded["tensor_bytes_after"] == index["metadata"]["total_size"] < recorded["tensor_bytes_before"]
    reference = load_model(ct[name], "float32").model  # the parameters counted are the dense model's
    apply_model_plan(reference, ADAPTERS[family], plan)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in reference.state_dict().values())
    assert "Quantization: compressed-tensors" in (out / "README.md").read_text()
    assert tree_digest(ct[name]) == source_digest


@pytest.mark.parametrize("name", ["mixtral-w4a16", "deepseek_v3-w8a8", "qwen3_moe-w4a16_asym", "mixtral-fp8"])
def test_output_reloads_as_the_pruned_model(name, ct, calib_file, tmp_path):
    """moeshrink's loader reads the output as the input with the plan applied in memory (both
    dequantized the same way): the same logits."""
    family = LAYOUTS[name][0]
    out = tmp_path / "out"
    plan = _prune(ct[name], calib_file, out, dtype="float32").plan
    reference = load_model(ct[name], "float32").model
    apply_model_plan(reference, ADAPTERS[family], plan)
    reloaded = load_model(out, "float32").model
    assert reloaded.config.quantization_config["quant_method"] == "compressed-tensors"
    assert torch.equal(_logits(reloaded), _logits(reference))


def test_dequantized_weights_are_near_the_dense_ones(ct):
    """The loader's dequantized model is the dense one it was made from, within each scheme's rounding."""
    dense = load_model(ct["qwen3_moe-dense"], "float32").model
    for name, bound in (("qwen3_moe-fp8_dynamic", 1 / 16), ("qwen3_moe-w4a16_asym", 1 / 4)):
        model = load_model(ct[name], "float32").model
        for key in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.2.self_attn.o_proj.weight"):
            a, b = dense.get_parameter(key), model.get_parameter(key)
            assert (a - b).abs().max() <= bound * a.abs().max(), (name, key)
            assert not torch.equal(a, b)


def test_ignore_list_and_group_targets_are_renumbered(ct, calib_file, tmp_path):
    """Mixtral's layer-1 expert 3 is left unquantized and listed in ignore; a second config group names
    layer 1's expert 5 by module name: the output lists both under their new numbers (or drops them
    with their expert), expert 3 in bfloat16 as it was."""
    model = tmp_path / "model"
    shutil.copytree(ct["mixtral-w4a16"], model)
    config = json.loads((model / "config.json").read_text())
    quant = config["quantization_config"]
    named = [f"model.layers.1.block_sparse_moe.experts.5.w{i}" for i in (1, 2, 3)]
    quant["config_groups"]["group_1"] = dict(quant["config_groups"]["group_0"], targets=named)
    (model / "config.json").write_text(json.dumps(config))
    result = _prune(model, calib_file, tmp_path / "out")
    kept = [e.sources[0] for e in next(lp for lp in result.plan.layers if lp.layer == 1).experts]
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    ignored = [n for n in written["ignore"] if "experts" in n]
    targets = written["config_groups"]["group_1"]["targets"]
    assert written["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert ignored == (
        [f"model.layers.1.block_sparse_moe.experts.{kept.index(3)}.w{i}" for i in (1, 2, 3)]
        if 3 in kept
        else []
    )
    assert targets == (
        [f"model.layers.1.block_sparse_moe.experts.{kept.index(5)}.w{i}" for i in (1, 2, 3)]
        if 5 in kept
        else []
    )
    assert sorted(n for n in written["ignore"] if "experts" not in n) == sorted(
        n for n in quant["ignore"] if "experts" not in n
    )
    assert_bit_exact(model, tmp_path / "out", result.plan)


def test_streamed_and_resident_write_the_same(ct, calib_file, tmp_path):
    """Streaming (the default with an output) and --no-stream give the same files; streamed, one decoder
    layer is held (dequantized) at a time."""
    path = ct["qwen3_moe-w4a16_asym"]
    config, adapter = load_config(path)
    reader = ShardReader(path)
    source = QuantizedLayers(
        path, config, adapter, reader, open_quantized(path, read_quantization(path), reader)
    )
    assert_one_layer_at_a_time(source)
    _prune(ct["qwen3_moe-w4a16_asym"], calib_file, tmp_path / "streamed")
    _prune(ct["qwen3_moe-w4a16_asym"], calib_file, tmp_path / "resident", stream=False)
    streamed, resident = tree_digest(tmp_path / "streamed"), tree_digest(tmp_path / "resident")
    assert {k: v for k, v in streamed.items() if k not in ("README.md", PLAN_FILENAME)} == {
        k: v for k, v in resident.items() if k not in ("README.md", PLAN_FILENAME)
    }


@pytest.mark.parametrize("method, options", [("reap", {}), ("stun", {"mode": "representative"}), ("ean", {})])
def test_pruning_methods(method, options, ct, calib_file, tmp_path):
    out = tmp_path / "out"
    _prune(ct["deepseek_v3-w8a8"], calib_file, out, method=method, method_options=options)
    assert_bit_exact(ct["deepseek_v3-w8a8"], out, ModelPlan.load(out / PLAN_FILENAME))


def test_global_budget(ct, calib_file, tmp_path):
    """Per-layer expert counts: each layer's packed experts, reloaded by moeshrink as the pruned model."""
    out = tmp_path / "out"
    name = "qwen3_moe-w4a16_asym"
    plan = _prune(ct[name], calib_file, out, global_budget=True).plan
    assert sum(lp.num_experts_after for lp in plan.layers) == 4 * len(plan.layers)
    assert_bit_exact(ct[name], out, plan)
    reference = load_model(ct[name], "float32").model
    apply_model_plan(reference, ADAPTERS["qwen3_moe"], plan)
    assert torch.equal(_logits(load_model(out, "float32").model), _logits(reference))


def test_verified_in_a_fresh_process(ct, calib_file, tmp_path):
    result = _prune(ct["mixtral-w4a16"], calib_file, tmp_path / "out", stream=False, verify=True)
    check = result.plan.verification["transformers"]
    assert check["status"] == "pass" and check["max_abs_diff"] <= check["tolerance"], check
    assert "compressed-tensors, dequantized" in check["detail"]


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_pack_unpack(bits):
    values = torch.randint(
        -(1 << (bits - 1)), 1 << (bits - 1), (7, 19), generator=torch.Generator().manual_seed(bits)
    )
    values = values.to(torch.int8)
    for dim in (0, 1):
        packed = pack_int32(values, bits, dim)
        assert packed.dtype == torch.int32
        assert packed.shape[dim] == -(-values.shape[dim] // (32 // bits))
        assert torch.equal(unpack_int32(packed, bits, values.shape[dim], dim), values)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dequantize_inverts_compress(preset):
    """Each preset's dequantized weight is within half a quantization step of the weight (FP8: its
    relative precision)."""
    config = quantization_config(preset, [], group_size=16, block=(16, 16))
    from moeshrink.quant import weight_group

    group: WeightGroup = weight_group(
        Path("."), "", "g", config["config_groups"]["group_0"], config["format"]
    )
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    local = compress_weight(weight, group)
    stored = local.get("weight_packed", local.get("weight"))
    out = dequantize(group, stored, local["weight_scale"], local.get("weight_zero_point"), shape=(40, 48))
    assert out.dtype == torch.bfloat16
    error = (out.float() - weight.float()).abs()
    if group.type == "float":
        assert (error <= weight.float().abs() / 8 + 1e-3).all()
    else:
        step = local["weight_scale"].float().max()
        assert error.max() <= step * 0.51 + 1e-2


def _fake(tmp_path: Path, dense: Path, quantization: dict) -> Path:
    """A checkpoint that declares ``quantization`` and whose weights cannot be read at all."""
    path = tmp_path / "model"
    shutil.copytree(dense, path, ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    return path


def _config(**changes) -> dict:
    config = quantization_config("W4A16", ["lm_head"], group_size=16)
    group = config["config_groups"]["group_0"]
    for key, value in changes.items():
        if key in ("weights", "input_activations"):
            group[key] = dict(group[key] or {}, **value)
        elif key == "group_format":
            group["format"] = value
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    "quantization, named",
    [
        (_config(format="nvfp4-pack-quantized", group_format="nvfp4-pack-quantized"), "nvfp4-pack-quantized"),
        (_config(format="mxfp4-pack-quantized", group_format="mxfp4-pack-quantized"), "mxfp4-pack-quantized"),
        (_config(format="marlin-24", group_format="marlin-24"), "marlin-24"),
        (_config(sparsity_config={"format": "sparse-24-bitmask"}), "sparse-24-bitmask"),
        (_config(quantization_status="frozen"), "quantization_status 'frozen'"),
        (_config(transform_config={"config_groups": {"u": {}}}), "transform_config"),
        (_config(weights={"type": "float", "num_bits": 4}), "float4 weights"),
        (_config(weights={"strategy": "tensor_group"}), "strategy 'tensor_group'"),
        (_config(weights={"num_bits": 3}), "3-bit packed weights"),
        (_config(input_activations={"num_bits": 4, "type": "int"}), "4-bit activations"),
        (_config(config_groups={}), "no config_groups"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unsupported_compressed_tensors_are_refused_before_loading(
    quantization, named, checkpoints, calib_file, tmp_path, capsys
):
    model = _fake(tmp_path, checkpoints["mixtral"], quantization)
    argv = ["prune", str(model), "--method", "frequency", "--keep", "4", "--calib", str(calib_file)]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "compressed-tensors" in err and named in err, err
    assert "decompress it first" in err
    assert not (tmp_path / "out").exists()


MODULE = "model.layers.1.block_sparse_moe.experts.0.w1"
QWEN = "model.layers.1.mlp.experts.2.down_proj"


@pytest.mark.parametrize(
    "name, change, expected",
    [
        ("mixtral-w4a16", lambda s: s.pop(f"{MODULE}.weight_scale"), f"has no {MODULE}.weight_scale"),
        (
            "mixtral-w4a16",
            lambda s: s.update({f"{MODULE}.weight_scale": s[f"{MODULE}.weight_scale"][:, :2].contiguous()}),
            "the scales and the config disagree",
        ),
        (
            "mixtral-w4a16",
            lambda s: s.update({f"{MODULE}.weight_shape": torch.tensor([96, 80])}),
            "weight_shape [96, 80] packed 8 to an int32 needs [96, 10]",
        ),
        ("mixtral-w4a16", lambda s: s.pop(f"{MODULE}.weight_shape"), f"has no {MODULE}.weight_shape"),
        (
            "qwen3_moe-w4a16_asym",
            lambda s: s.pop(f"{QWEN}.weight_zero_point"),
            f"has no {QWEN}.weight_zero_point",
        ),
        (
            "qwen3_moe-fp8_dynamic",
            lambda s: s.update({f"{QWEN}.weight": s[f"{QWEN}.weight"].to(torch.int8)}),
            "stores F8_E4M3 matrices",
        ),
        (
            "qwen3_moe-fp8_dynamic",
            lambda s: s.update({f"{QWEN}.weight_scale": s[f"{QWEN}.weight_scale"].reshape(-1).contiguous()}),
            "channel strategy",
        ),
        (
            "qwen3_moe-fp8_dynamic",
            lambda s: s.update({f"{QWEN}.weight": s[f"{QWEN}.weight"].to(torch.bfloat16)}),
            f"{QWEN}.weight_scale has no quantized weight beside it",
        ),
    ],
    ids=[
        "missing scale",
        "mis-shaped scale",
        "wrong weight_shape",
        "missing weight_shape",
        "missing zero point",
        "int8 weight in an FP8 group",
        "flat channel scale",
        "scale without weight",
    ],
)
def test_bad_tensors_are_refused(name, change, expected, ct, calib_file, tmp_path):
    model = broken_copy(tmp_path, ct[name], change)
    with pytest.raises(MoeShrinkError, match=expected.replace("[", r"\[").replace("]", r"\]")) as err:
        _prune(model, calib_file, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_quantized_router_is_refused(ct, calib_file, tmp_path):
    """A router quantized with the experts (not in ignore) cannot have its rows sliced bit-exact."""
    model = tmp_path / "model"
    dense = ct["qwen3_moe-dense"]
    write_compressed_tensors(dense, model, "FP8_DYNAMIC")
    state = load_file(model / "model.safetensors")
    router = "model.layers.0.mlp.gate"
    local = compress_weight(state.pop(f"{router}.weight"), read_quantization(model).groups["group_0"])
    state |= {f"{router}.{k}": v for k, v in local.items()}
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeShrinkError, match=f"router {router} is stored quantized"):
        _prune(model, calib_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_ignore_regex_naming_an_expert_is_refused(ct, calib_file, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ct["mixtral-w4a16"], model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["ignore"].append(r"re:.*layers\.1\..*experts\.3\..*")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeShrinkError, match="names a routed expert by a regex"):
        _prune(model, calib_file, tmp_path / "out")


def test_apply_is_refused(ct, calib_file, tmp_path):
    plan = _prune(ct["mixtral-w4a16"], calib_file, tmp_path / "out").plan
    with pytest.raises(
        MoeShrinkError, match="compressed-tensors: 'moeshrink apply' does not work on quantized"
    ):
        moeshrink.apply_plan(ct["mixtral-w4a16"], plan, tmp_path / "applied")
