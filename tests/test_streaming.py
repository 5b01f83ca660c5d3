"""Streaming by layer: the streamed output equals the in-memory one, one layer is held at a time,
hidden states can live on disk, and bad shards or a full disk stop it early with nothing left behind."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moeshrink
from moeshrink.engine.data import build_calibration
from moeshrink.engine.offload import SpilledBatches
from moeshrink.engine.runner import run_steps
from moeshrink.engine.steps import ExpertsStep
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model, load_tokenizer
from moeshrink.io.streaming import StreamedLayers, check_free_disk
from moeshrink.methods import get_method
from moeshrink.testbed.tiny import build_tiny_model

from .conftest import tree_digest


def _prune(model, calib, out, **kw):
    args = dict(method="frequency", keep=4, calib=calib, output=out, samples=4, seq_len=32, progress=False)
    return moeshrink.prune(model, **(args | kw))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "moeshrink_plan.json").read_text() == (b / "moeshrink_plan.json").read_text()


def _resave(source: Path, dest: Path, **save_kwargs) -> Path:
    """The same model saved again (e.g. in shards, or with fused expert keys), tokenizer included."""
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(dest, **save_kwargs)
    for f in source.glob("tokenizer*"):
        shutil.copy2(f, dest / f.name)
    return dest


@pytest.mark.parametrize(
    "family, method, dtype",
    [
        ("mixtral", "frequency", torch.bfloat16),
        ("qwen3_moe", "reap", torch.float16),
        ("qwen3_moe", "msmoe", torch.float32),
        ("gpt_oss", "frequency", torch.float32),  # fused expert tensors on disk
    ],
)
def test_streamed_output_equals_in_memory(family, method, dtype, tmp_path, calib_file):
    model = build_tiny_model(family, tmp_path / "model", seed=3, dtype=dtype)
    if family == "mixtral":  # several input shards, a layer's tensors spread over them
        model = _resave(model, tmp_path / "sharded", max_shard_size="150KB")
        assert len(list(model.glob("*.safetensors"))) > 3
    before = tree_digest(model)
    memory = _prune(model, calib_file, tmp_path / "memory", method=method, stream=False)
    streamed = _prune(model, calib_file, tmp_path / "streamed", method=method, stream=True)
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert streamed.after == memory.after and tree_digest(model) == before
    # the skeleton returned holds no decoder layer's weights any more
    assert all(p.is_meta for layer in streamed.model.model.layers for p in layer.parameters())
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(tmp_path / "streamed"))
    reloaded = load_model(tmp_path / "streamed")
    assert reloaded.adapter.moe_layers(reloaded.model)[0].num_experts == 4


def test_fused_mixtral_keys_on_disk_stay_fused_as_in_memory(tmp_path, calib_file, checkpoints):
    """A Mixtral saved with fused expert keys: transformers converts nothing on load, so
    ``save_pretrained`` writes fused keys back; the streamed output does the same."""
    fused = _resave(checkpoints["mixtral"], tmp_path / "fused", save_original_format=False)
    with safe_open(fused / "model.safetensors", "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    _prune(fused, calib_file, tmp_path / "memory", stream=False)
    _prune(fused, calib_file, tmp_path / "streamed", stream=True)
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert "model.layers.0.mlp.experts.gate_up_proj" in _tensors(tmp_path / "streamed")


def test_one_decoder_layer_at_a_time_and_hidden_states_on_disk(tmp_path, calib_file, checkpoints):
    path = checkpoints["qwen3_moe"]
    streamer = StreamedLayers.open(path)
    layers = streamer.layers
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    seen = []

    def count_materialised(module, args):
        seen.append(sum(not next(layer.parameters()).is_meta for layer in layers))

    for layer in layers:
        layer.register_forward_pre_hook(count_materialised)
    ids = build_calibration(load_tokenizer(path), [calib_file], 4, 32, 0).input_ids
    method = get_method("frequency")
    offload = tmp_path / "hidden"
    step = ExpertsStep(method=method, per_layer=dict.fromkeys(range(3), 4), top_k=2)
    _, (plans,) = run_steps(streamer, [step], ids, batch_size=2, progress=False, offload_hidden=offload)
    gc.collect()
    assert [p.num_experts_after for p in plans.values()] == [4, 4, 4]
    assert seen and max(seen) == 1 and streamer.max_loaded == 1
    assert list(offload.iterdir()) == []  # every layer's spilled hidden states were removed
    # hidden states on disk give the same checkpoint as in memory
    _prune(path, calib_file, tmp_path / "in-ram", stream=True)
    _prune(path, calib_file, tmp_path / "on-disk", stream=True, offload_hidden=offload)
    _assert_same_checkpoint(tmp_path / "in-ram", tmp_path / "on-disk")


def test_spilled_batches_round_trip(tmp_path):
    tensors = [torch.randn(2, 3, 4) for _ in range(3)]
    spilled = SpilledBatches.of(tensors, tmp_path, "cpu")
    assert len(spilled) == 3 and all(torch.equal(a, b) for a, b in zip(tensors, spilled, strict=True))
    directory = spilled.directory
    del spilled
    gc.collect()
    assert not directory.exists()


def _sharded(source: Path, dest: Path) -> Path:
    return _resave(source, dest, max_shard_size="150KB")


def test_missing_shard_stops_streaming_before_any_output(tmp_path, calib_file, checkpoints):
    model = _sharded(checkpoints["mixtral"], tmp_path / "m")
    shards = sorted(model.glob("model-*.safetensors"))
    shards[len(shards) // 2].unlink()
    with pytest.raises(MoeShrinkError, match=f"shard {shards[len(shards) // 2].name} .* is missing"):
        _prune(model, calib_file, tmp_path / "out", stream=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_truncated_shard_stops_streaming_before_any_output(tmp_path, calib_file, checkpoints):
    model = _sharded(checkpoints["mixtral"], tmp_path / "m")
    last = sorted(model.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(MoeShrinkError, match=f"{last.name}: truncated .* re-download"):
        _prune(model, calib_file, tmp_path / "out", stream=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_index_naming_the_wrong_shard(tmp_path, calib_file, checkpoints):
    model = _sharded(checkpoints["mixtral"], tmp_path / "m")
    index_file = model / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = next(k for k in index["weight_map"] if "layers.2" in k)
    other = next(v for v in sorted(set(index["weight_map"].values())) if v != index["weight_map"][key])
    index["weight_map"][key] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(MoeShrinkError, match=f"puts {key} in {other} but that shard does not hold it"):
        _prune(model, calib_file, tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists()


def test_too_little_free_disk_is_refused_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(
        MoeShrinkError, match="not enough free disk for the output .* GiB free; free some space"
    ):
        check_free_disk(tmp_path / "out", needed=free + (1 << 30))
    assert list(tmp_path.iterdir()) == []
    check_free_disk(tmp_path / "out", needed=1 << 20)  # a small output fits


def test_error_in_a_later_layer_leaves_nothing_behind(tmp_path, calib_file, checkpoints):
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if "layers.2." in k and "experts.3" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeShrinkError, match=r"model.layers.2.* contains NaN or inf") as err:
        _prune(model, calib_file, tmp_path / "out", stream=True)
    del err
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # layers 0 and 1 were written, then removed


def test_streaming_option_errors(tmp_path, calib_file, checkpoints):
    with pytest.raises(MoeShrinkError, match="--stream writes the pruned layers as it goes: give an output"):
        _prune(checkpoints["mixtral"], calib_file, None, stream=True)
    with pytest.raises(MoeShrinkError, match="--stream does not support OWL yet"):
        _prune(
            checkpoints["mixtral"],
            calib_file,
            tmp_path / "out",
            stream=True,
            sparsity=0.5,
            sparsity_method="owl",
        )
    assert not (tmp_path / "out").exists()


def test_cli_stream_without_calibration_data(tmp_path, checkpoints):
    """``--stream`` on the command line, with a method that needs no data (no forward pass: the
    layers are still read, pruned and written one at a time, deepseek's dense first layer included)."""
    from moeshrink.cli import main

    path = checkpoints["deepseek_v3"]
    common = ["prune", str(path), "--method", "random", "--keep", "4", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "memory"), "--no-stream"]) == 0
    assert main([*common, "-o", str(tmp_path / "streamed"), "--stream"]) == 0
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")


@pytest.mark.parametrize("method, options", [("frequency", {}), ("stun", {}), ("stun", {"selective": False})])
def test_streamed_global_budget_equals_in_memory(method, options, tmp_path, calib_file, checkpoints):
    """A global budget streams too: a read-only statistics pass (each layer read and freed), then the
    compression pass; per-layer counts are written fused, as the in-memory export writes them."""
    source = checkpoints["qwen3_moe"]
    kw = dict(method=method, keep=4, global_budget=True, method_options=options)
    memory = _prune(source, calib_file, tmp_path / "memory", stream=False, **kw)
    streamed = _prune(source, calib_file, tmp_path / "stream", stream=True, **kw)
    assert streamed.plan.budget["per_layer"] == memory.plan.budget["per_layer"]
    assert len(set(memory.plan.budget["per_layer"].values())) > 1  # different counts per layer here
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    reloaded = load_model(tmp_path / "stream").model
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, memory.model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family, kw",
    [
        ("qwen2_moe", dict(method="stun", keep=None, ratio=0.25, total_sparsity=0.55, sparsity_scope="all")),
        ("mixtral", dict(method="none", keep=None, nm="2:4")),
    ],
)
def test_streamed_sparsity_equals_in_memory(family, kw, tmp_path, calib_file, checkpoints):
    """Wanda / N:M inside experts (and attention, dense layers) stream: the same zeros, the same exact
    accounting (each layer's zeros counted before it is written and freed)."""
    memory = _prune(checkpoints[family], calib_file, tmp_path / "memory", stream=False, **kw)
    streamed = _prune(checkpoints[family], calib_file, tmp_path / "stream", stream=True, **kw)
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    a, b = streamed.sparsity, memory.sparsity
    assert {t.name: t for t in a.tensors} == {t.name: t for t in b.tensors}  # counted in another order
    assert (a.all, a.experts, a.layers) == (b.all, b.experts, b.layers)
    assert streamed.plan.sparsity == memory.plan.sparsity
