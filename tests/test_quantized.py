"""Block-FP8 checkpoints in and out (issue #15): tiny mixtral, qwen3_moe and deepseek_v3 written in
DeepSeek-V3's and the Qwen3 FP8 releases' layouts (float8_e4m3fn weights, ``weight_scale_inv`` per
16x16 tile, DeepSeek's MLA with partial tiles), pruned; the kept experts' bytes are the input's, the
output reloads as the pruned model; every other scheme, and what cannot be done on FP8, is refused
in one line before any weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.arch import ADAPTERS
from moeshrink.cli import main
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_config, load_model
from moeshrink.io.streaming import ShardReader
from moeshrink.job import PruneResult
from moeshrink.plan import PLAN_FILENAME, LayerPlan, ModelPlan, NewExpert
from moeshrink.quant import read_quantization
from moeshrink.quant.fp8 import dequantize
from moeshrink.quant.source import EXPERT_KEY, BlockFP8Layers, open_block_fp8, renumber_ignored
from moeshrink.surgery import apply_model_plan
from moeshrink.testbed.fp8 import write_block_fp8
from moeshrink.testbed.tiny import build_tiny_model

from .conftest import assert_one_layer_at_a_time, broken_copy, tree_digest

BLOCK = (16, 16)
# family -> (layout, modules left unquantized and listed in modules_to_not_convert)
LAYOUTS = {
    "mixtral": ("deepseek", ["model.layers.1.block_sparse_moe.experts.3"]),
    "qwen3_moe": ("qwen3", []),
    "deepseek_v3": ("deepseek", []),
}
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 4, 8, 100, 7], [3, 17, 250, 11, 6, 90, 40, 2, 2, 19]])


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> dict[str, Path]:
    """Tiny bfloat16 checkpoints written as block-FP8."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for family, (style, skip) in LAYOUTS.items():
        dense = build_tiny_model(family, root / f"{family}-dense", seed=1, dtype=torch.bfloat16)
        out[family] = write_block_fp8(dense, root / family, BLOCK, style=style, not_converted=skip)
    return out


def _prune(model: Path, calib: Path, out: Path, **kw) -> PruneResult:
    args = dict(method="frequency", keep=4, calib=calib, output=out, samples=4, seq_len=32, progress=False)
    return moeshrink.prune(str(model), **(args | kw))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def _copied(expert: NewExpert) -> int:
    (source,) = [s for s, w in zip(expert.sources, expert.weights, strict=True) if w != 0]
    assert expert.weights[expert.sources.index(source)] == 1.0 and not expert.refit
    return source


def assert_bit_exact(source: Path, output: Path, plan: ModelPlan) -> None:
    """Every tensor of the output is the input's (kept experts under their new numbers, routers' rows
    chosen by the plan), byte for byte, and nothing else is there."""
    before, after = _tensors(source), _tensors(output)
    plans = {lp.layer: lp for lp in plan.layers}
    expected: dict[str, torch.Tensor] = {}
    for name, tensor in before.items():
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        lp = plans.get(layer)
        match = EXPERT_KEY.match(name)
        if lp is not None and match:  # each new expert is one old expert (STUN: weight 1, the rest 0)
            kept = [i for i, e in enumerate(lp.experts) if _copied(e) == int(match["index"])]
            for new in kept:
                expected[f"{match['head']}experts.{new}{match['tail']}"] = tensor
        elif (  # a router (attention tensors may have as many rows: a packed zero point)
            lp is not None
            and tensor.ndim >= 1
            and tensor.shape[0] == lp.num_experts_before
            and "self_attn" not in name
        ):
            rows = [
                sum(w * tensor[s].double() for s, w in zip(e.sources, e.router_weights, strict=True))
                for e in lp.experts
            ]
            expected[name] = torch.stack(rows).to(tensor.dtype)
        else:
            expected[name] = tensor
    assert sorted(after) == sorted(expected)
    different = [k for k in expected if not _same_bytes(after[k], expected[k])]
    assert not different, different[:5]


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_prune_keeps_the_experts_bytes(family, fp8, calib_file, tmp_path):
    out = tmp_path / "out"
    source_digest = tree_digest(fp8[family])
    result = _prune(fp8[family], calib_file, out)
    plan = ModelPlan.load(out / PLAN_FILENAME)
    assert all(len(lp.experts) == 4 and all(e.is_plain_copy for e in lp.experts) for lp in plan.layers)
    assert_bit_exact(fp8[family], out, plan)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((fp8[family] / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(BLOCK)
    assert config["dtype"] == source_config["dtype"] == "bfloat16"
    quant = result.plan.source["quantization"]
    assert quant["scheme"] == "block-FP8" and quant["weight_block_size"] == list(BLOCK)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert quant["tensor_bytes_after"] == index["metadata"]["total_size"] < quant["tensor_bytes_before"]
    assert quant["tensor_bytes_before"] == ShardReader(fp8[family]).total_bytes
    assert "Quantization: block-FP8" in (out / "README.md").read_text()
    assert tree_digest(fp8[family]) == source_digest


def test_ignore_list_is_renumbered(fp8, calib_file, tmp_path):
    """Mixtral's layer-1 expert 3 is left unquantized and listed in modules_to_not_convert: the output
    lists it under its new number (or not at all where it was pruned), in bfloat16 as it was."""
    result = _prune(fp8["mixtral"], calib_file, tmp_path / "out")
    layer1 = next(lp for lp in result.plan.layers if lp.layer == 1)
    listed = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    listed = listed["modules_to_not_convert"]
    kept = [e.sources[0] for e in layer1.experts]
    if 3 in kept:
        new = kept.index(3)
        assert listed == [f"model.layers.1.block_sparse_moe.experts.{new}.w{i}" for i in (1, 2, 3)]
        with safe_open(tmp_path / "out" / "model-00002-of-00004.safetensors", "pt") as f:
            assert (
                f.get_slice(f"model.layers.1.block_sparse_moe.experts.{new}.w1.weight").get_dtype() == "BF16"
            )
    else:
        assert listed == []


def test_renumber_ignored_names():
    plan = LayerPlan.keep(2, 8, [1, 5, 6])
    names = [
        "lm_head",
        "model.layers.2.mlp.gate",
        "model.layers.2.mlp.experts.5",
        "model.layers.2.mlp.experts.0.up_proj",
    ]
    names += ["model.layers.3.mlp.experts.0", "model.layers.2.mlp.shared_experts.gate_proj"]
    assert renumber_ignored(names, {2: plan}) == [
        "lm_head",
        "model.layers.2.mlp.gate",
        "model.layers.2.mlp.experts.1",
        "model.layers.3.mlp.experts.0",
        "model.layers.2.mlp.shared_experts.gate_proj",
    ]


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_output_reloads_as_the_pruned_model(family, fp8, calib_file, tmp_path):
    """moeshrink's loader reads the output as the input with the plan applied in memory (both
    dequantized by weight_block_size): the same logits. transformers (which dequantizes on a CPU)
    agrees where it can load the checkpoint: not deepseek_v3 (partial tiles, see below), nor this
    mixtral, whose one unquantized expert it cannot load ("weight/scale count mismatch"), the input
    no more than the output."""
    out = tmp_path / "out"
    plan = _prune(fp8[family], calib_file, out, dtype="float32").plan  # computed in float32, stored as it was
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = load_model(fp8[family], "float32").model
    apply_model_plan(reference, ADAPTERS[family], plan)
    expected = _logits(reference)
    reloaded = load_model(out, "float32").model
    assert reloaded.config.quantization_config["quant_method"] == "fp8"
    assert torch.equal(_logits(reloaded), expected)
    if family == "qwen3_moe":  # transformers dequantizes into the dtype asked: bfloat16, then upcast
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).float()
        assert (_logits(hf) - expected).abs().max() <= 1e-5


def test_transformers_misreads_partial_tiles(fp8):
    """Why verification reads FP8 outputs with moeshrink's loader: transformers 5.x derives the tile
    size from the scale grid's shape (24 rows / 2 scale rows = 12), not from weight_block_size (16),
    so DeepSeek's kv_a_proj_with_mqa (24 rows here, 576 in DeepSeek-V3) comes out wrong on a CPU,
    while whole tiles (q_proj) come out as moeshrink's loader gives them."""
    state = _tensors(fp8["deepseek_v3"])
    ours = load_model(fp8["deepseek_v3"], "bfloat16").model
    hf = AutoModelForCausalLM.from_pretrained(fp8["deepseek_v3"], dtype=torch.bfloat16)
    for module, whole in (("q_proj", True), ("kv_a_proj_with_mqa", False)):
        name = f"model.layers.1.self_attn.{module}.weight"
        assert (state[name].shape[0] % BLOCK[0] == 0) == whole
        right = dequantize(state[name], state[name + "_scale_inv"], BLOCK, torch.bfloat16)
        assert torch.equal(ours.get_parameter(name), right)
        assert torch.equal(hf.get_parameter(name), right) == whole


def test_streamed_and_resident_write_the_same(fp8, calib_file, tmp_path):
    """Streaming (the default with an output) and --no-stream give the same files; streamed, one
    decoder layer is dequantized at a time."""
    _prune(fp8["qwen3_moe"], calib_file, tmp_path / "streamed")
    _prune(fp8["qwen3_moe"], calib_file, tmp_path / "resident", stream=False)
    streamed, resident = tree_digest(tmp_path / "streamed"), tree_digest(tmp_path / "resident")
    assert {k: v for k, v in streamed.items() if k not in ("README.md", PLAN_FILENAME)} == {
        k: v for k, v in resident.items() if k not in ("README.md", PLAN_FILENAME)
    }
    path = fp8["qwen3_moe"]
    config, adapter = load_config(path)
    reader = ShardReader(path)
    source = BlockFP8Layers(
        path, config, adapter, reader, open_block_fp8(path, read_quantization(path), reader)
    )
    assert_one_layer_at_a_time(source)


def test_verified_in_a_fresh_process(fp8, calib_file, tmp_path):
    result = _prune(fp8["mixtral"], calib_file, tmp_path / "out", stream=False, verify=True)
    check = result.plan.verification["transformers"]
    assert check["status"] == "pass" and check["max_abs_diff"] <= check["tolerance"], check
    assert "block-FP8, dequantized" in check["detail"]


@pytest.mark.parametrize(
    "method, options",
    [
        ("random", {}),
        ("soft_activation", {}),
        ("ean", {}),
        ("reap", {}),
        ("naee", {"max_subsets": 50}),
        ("stun", {"mode": "representative"}),
    ],
)
def test_every_pruning_method(method, options, fp8, calib_file, tmp_path):
    out = tmp_path / "out"
    _prune(fp8["mixtral"], calib_file, out, method=method, method_options=options)
    assert_bit_exact(fp8["mixtral"], out, ModelPlan.load(out / PLAN_FILENAME))


def test_global_budget(fp8, calib_file, tmp_path):
    """Per-layer expert counts: the per-expert FP8 tensors of each layer, reloaded by moeshrink."""
    out = tmp_path / "out"
    plan = _prune(fp8["qwen3_moe"], calib_file, out, global_budget=True).plan
    assert sum(lp.num_experts_after for lp in plan.layers) == 4 * len(plan.layers)
    assert_bit_exact(fp8["qwen3_moe"], out, plan)
    reference = load_model(fp8["qwen3_moe"], "float32").model
    apply_model_plan(reference, ADAPTERS["qwen3_moe"], plan)
    assert torch.equal(_logits(load_model(out, "float32").model), _logits(reference))


def _fake_quantized(tmp_path: Path, dense: Path, quantization: dict | None, file: str | None = None) -> Path:
    """A checkpoint that declares ``quantization`` and whose weights cannot be read at all (so a refusal
    shows nothing was read)."""
    path = tmp_path / "model"
    shutil.copytree(dense, path, ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    if file is None:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = quantization
        (path / "config.json").write_text(json.dumps(config))
    else:
        (path / file).write_text(json.dumps(quantization or {}))
    return path


@pytest.mark.parametrize(
    "quantization, file, named",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, None, "gptq"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, None, "awq"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, "bitsandbytes"),
        ({"quant_method": "mxfp4"}, None, "mxfp4"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, None, "modelopt (NVFP4)"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, None, "compressed-tensors"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, "without a weight_block_size"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, None, "ue8m0"),
        ({"bits": 4, "group_size": 128, "desc_act": False}, "quantize_config.json", "gptq"),
    ],
)
def test_unsupported_schemes_are_refused_before_loading(
    quantization, file, named, checkpoints, calib_file, tmp_path, capsys
):
    model = _fake_quantized(tmp_path, checkpoints["mixtral"], quantization, file)
    argv = ["prune", str(model), "--method", "frequency", "--keep", "4", "--calib", str(calib_file)]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err
    assert not (tmp_path / "out").exists()


SCALE = "model.layers.1.block_sparse_moe.experts.0.w1.weight_scale_inv"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s.pop(SCALE), "has no model.layers.1.block_sparse_moe.experts.0.w1.weight_scale_inv"),
        (
            lambda s: s.update({SCALE: s[SCALE][:, :2].contiguous()}),
            "the scales and weight_block_size disagree",
        ),
    ],
    ids=["missing scale", "mis-shaped scale"],
)
def test_bad_scales_are_refused(change, expected, fp8, calib_file, tmp_path):
    model = broken_copy(tmp_path, fp8["mixtral"], change)
    with pytest.raises(MoeShrinkError, match=expected) as err:
        _prune(model, calib_file, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_apply_is_refused(fp8, calib_file, tmp_path):
    plan = _prune(fp8["mixtral"], calib_file, tmp_path / "out").plan
    with pytest.raises(MoeShrinkError, match="'moeshrink apply' does not work on quantized"):
        moeshrink.apply_plan(fp8["mixtral"], plan, tmp_path / "applied")


def test_a_merged_plan_is_not_written(fp8, tmp_path):
    """The export itself refuses a plan whose new experts are not copies (nothing written)."""
    path = fp8["mixtral"]
    config, adapter = load_config(path)
    reader = ShardReader(path)
    source = BlockFP8Layers(
        path, config, adapter, reader, open_block_fp8(path, read_quantization(path), reader)
    )
    merged = NewExpert(sources=[0, 1], weights=[0.5, 0.5], router_weights=[0.5, 0.5])
    layers = [
        LayerPlan(layer=i, num_experts_before=8, experts=[merged] + [NewExpert.keep(j) for j in (2, 3)])
        for i in range(3)
    ]
    plan = ModelPlan(method="msmoe", budget={"keep": 3}, top_k=2, layers=layers)
    with pytest.raises(MoeShrinkError, match="new expert 0 merges experts"):
        source.commit(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
