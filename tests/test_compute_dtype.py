"""Half-precision checkpoints on a CPU without native arithmetic for them: the layer loop computes each
layer in float32 (moeshrink.runtime.compute_dtype) and the output keeps every tensor's own dtype.
float16 takes that path on every CPU (bfloat16 only where the CPU lacks AVX-512 BF16), so it is the
one tested here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import moeshrink
from moeshrink.methods import METHODS
from moeshrink.testbed.tiny import build_tiny_model


def tensor_dtypes(directory) -> dict[str, str]:
    dtypes = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                dtypes[name] = str(f.get_slice(name).get_dtype())
    return dtypes


@pytest.fixture(scope="module")
def half_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("half")
    return {
        family: build_tiny_model(family, root / family, seed=1, dtype=torch.float16)
        for family in ("mixtral", "deepseek_v3")
    }


def _prune(path, method, output, **fields):
    return moeshrink.prune(
        path, method, keep=4, samples=4, seq_len=32, output=output, progress=False, **fields
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_computes_half_precision_in_float32_and_writes_the_input_dtypes(
    method, half_models, calib_file, tmp_path
):
    path = half_models["deepseek_v3"]
    result = _prune(path, method, tmp_path / "o", calib=calib_file)
    calibration = result.plan.calibration  # None for methods that read no data (random)
    assert calibration is None or calibration["compute_dtype"] == "float32"
    written, source = tensor_dtypes(tmp_path / "o"), tensor_dtypes(path)
    assert set(written.values()) <= set(source.values())
    for name, dtype in written.items():  # the float32 router stays float32, the rest float16
        assert dtype == source.get(name, dtype), name
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"


def test_float32_compute_of_a_float16_model_chooses_what_float32_weights_choose(
    half_models, calib_file, tmp_path
):
    """Upcasting is exact, so the choices match a run on the same weights loaded in float32; kept
    experts are written bit-exact in float16."""
    path = half_models["mixtral"]
    half = _prune(path, "reap", tmp_path / "half", calib=calib_file)
    full = _prune(path, "reap", tmp_path / "full", calib=calib_file, dtype="float32")
    assert full.plan.calibration["compute_dtype"] == "float32"
    assert [lp.kept for lp in half.plan.layers] == [lp.kept for lp in full.plan.layers]
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(path).model.layers[0].mlp.experts
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "half").model.layers[0].mlp.experts
    kept = half.plan.layers[0].kept
    for name in ("gate_up_proj", "down_proj"):
        assert getattr(after, name).dtype == torch.float16
        assert torch.equal(getattr(after, name), getattr(before, name)[kept])


def test_the_layer_loop_computes_in_float32_and_puts_every_tensor_back(half_models):
    from transformers import AutoModelForCausalLM

    from moeshrink.arch import get_adapter
    from moeshrink.engine.runner import collect_layer_stats

    model = AutoModelForCausalLM.from_pretrained(half_models["deepseek_v3"])
    adapter = get_adapter(model.config)
    before = {name: (t.dtype, t.clone()) for name, t in model.state_dict().items()}
    seen = []
    layer = adapter.decoder_layers(model)[-1]
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args or (kwargs["hidden_states"],))[0].dtype),
        with_kwargs=True,
    )
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        collect_layer_stats(model, adapter, ids, frozenset({"counts"}), progress=False)
    finally:
        handle.remove()
    # first the embedding pass (the layers are pass-throughs then, in float16), then the layer loop
    assert seen[0] == torch.float16 and len(seen) > 1 and set(seen[1:]) == {torch.float32}
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == before[name][0], name
        assert torch.equal(tensor, before[name][1]), name


def test_recovery_of_a_float16_model_is_fitted_in_float32_and_written_in_float16(
    half_models, calib_file, tmp_path
):
    path = half_models["deepseek_v3"]
    result = _prune(path, "reap", tmp_path / "o", calib=calib_file, recover=True)
    assert result.plan.calibration["compute_dtype"] == "float32"
    assert all(lp.recovery is not None for lp in result.plan.layers)
    written, source = tensor_dtypes(tmp_path / "o"), tensor_dtypes(path)
    for name, dtype in written.items():
        assert dtype == source.get(name, dtype), name
