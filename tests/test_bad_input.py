"""Bad input: a one-line error naming the problem and the fix, before heavy work; inputs untouched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import moeshrink
from moeshrink.errors import MoeShrinkError
from moeshrink.testbed.tiny import build_tiny_model, build_tiny_tokenizer

from .conftest import tree_digest


def _prune(model, calib, out, **kw):
    args = dict(method="frequency", keep=4, calib=calib, output=out, samples=4, seq_len=32, progress=False)
    return moeshrink.prune(model, **(args | kw))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_dense_model(tmp_path, calib_file):
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=512
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(MoeShrinkError) as err:
        _prune(tmp_path / "dense", calib_file, tmp_path / "out")
    assert "'llama' is not a mixture-of-experts model" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_unknown_model_type(tmp_path, checkpoints, calib_file):
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "my_new_moe"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeShrinkError) as err:
        _prune(model, calib_file, tmp_path / "out")
    assert "my_new_moe" in _one_line(err) and "mixtral" in str(err.value)


@pytest.mark.parametrize(
    "family, kwargs, expected",
    [
        ("mixtral", {"keep": 8}, "removes nothing"),
        ("mixtral", {"keep": 9}, "removes nothing"),
        ("mixtral", {"keep": 1}, "fewer than the 2 each token uses"),
        ("qwen3_moe", {"keep": 3, "top_k": 4}, "fewer than the 4 each token uses"),
        ("mixtral", {"keep": None, "ratio": 1.5}, r"must be in \(0, 1\)"),
        ("mixtral", {"keep": 4, "ratio": 0.5}, "exactly one budget"),
        ("deepseek_v3", {"keep": 5}, "multiple of 2"),
        ("deepseek_v3", {"keep": 2}, "at least 4 experts .2 per group."),
        ("phimoe", {"keep": 4, "top_k": 1}, "cannot be changed"),
    ],
)
def test_bad_budgets(family, kwargs, expected, checkpoints, calib_file, tmp_path):
    with pytest.raises(MoeShrinkError, match=expected) as err:
        _prune(checkpoints[family], calib_file, tmp_path / "out", **kwargs)
    _one_line(err)


def test_unknown_method(checkpoints, calib_file, tmp_path):
    with pytest.raises(MoeShrinkError, match="unknown method 'nope'; known methods: .*frequency"):
        _prune(checkpoints["mixtral"], calib_file, tmp_path / "out", method="nope")


def test_empty_calibration_text(checkpoints, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MoeShrinkError, match="calibration text is empty"):
        _prune(checkpoints["mixtral"], empty, tmp_path / "out")


def test_too_short_calibration_text(checkpoints, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(MoeShrinkError, match="calibration text too short: .* give more text or lower"):
        _prune(checkpoints["mixtral"], short, tmp_path / "out")


def test_missing_calibration_file(checkpoints, tmp_path):
    with pytest.raises(MoeShrinkError, match="calibration file not found"):
        _prune(checkpoints["mixtral"], tmp_path / "nope.txt", tmp_path / "out")


def test_method_that_needs_data_without_calib(checkpoints, tmp_path):
    with pytest.raises(MoeShrinkError, match="needs calibration text: pass --calib"):
        _prune(checkpoints["mixtral"], None, tmp_path / "out")


def _sharded_copy(source, dest):
    """Re-save a checkpoint as two shards with an index, like real multi-GB checkpoints."""
    dest.mkdir()
    for f in source.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dest / f.name)
    tensors = load_file(source / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, dest / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_prunes(checkpoints, calib_file, tmp_path):
    _sharded_copy(checkpoints["mixtral"], tmp_path / "sharded")
    result = _prune(tmp_path / "sharded", calib_file, tmp_path / "out")
    assert result.after.experts_per_layer == [4, 4, 4]


def test_missing_shard(checkpoints, calib_file, tmp_path):
    _sharded_copy(checkpoints["mixtral"], tmp_path / "sharded")
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MoeShrinkError, match="shard model-00002-of-00002.safetensors .* is missing") as err:
        _prune(tmp_path / "sharded", calib_file, tmp_path / "out")
    _one_line(err)
    assert not (tmp_path / "out").exists()


def test_truncated_shard(checkpoints, calib_file, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(MoeShrinkError, match="truncated .* re-download"):
        _prune(model, calib_file, tmp_path / "out")


def test_existing_output_directory_is_refused_before_any_work(checkpoints, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    with pytest.raises(MoeShrinkError, match="already exists: choose another or pass --overwrite"):
        _prune(checkpoints["mixtral"], calib_file, out)
    assert (out / "keep-me.txt").read_text() == "precious"


def test_overwrite_replaces_the_output(checkpoints, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _prune(checkpoints["mixtral"], calib_file, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nan_weights(checkpoints, calib_file, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if "experts.3" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    before = tree_digest(model)
    with pytest.raises(MoeShrinkError, match=r"contains NaN or inf") as err:
        _prune(model, calib_file, tmp_path / "out")
    _one_line(err)
    assert tree_digest(model) == before and not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing_behind(checkpoints, calib_file, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        _prune(checkpoints["mixtral"], calib_file, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_model_directory(tmp_path, calib_file):
    with pytest.raises(MoeShrinkError, match="model directory not found"):
        _prune(tmp_path / "nowhere", calib_file, tmp_path / "out")


def test_jsonl_with_a_malformed_line_names_file_and_line(tmp_path):
    from moeshrink.engine.data import read_documents

    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(MoeShrinkError, match=r"data.jsonl:2: not valid JSON"):
        read_documents([bad])
    missing_field = tmp_path / "field.jsonl"
    missing_field.write_text('{"body": "x"}\n')
    with pytest.raises(
        MoeShrinkError, match=r"field.jsonl:1: no text field 'text'; choose the field with --calib-field"
    ):
        read_documents([missing_field])


def test_calibration_is_deterministic_and_reads_every_format(tmp_path):
    import datasets

    from moeshrink.engine.data import build_calibration

    tok = build_tiny_tokenizer(tmp_path / "tok")
    docs = [f"Document number {i} talks about experts, routers and tokens." * 3 for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs))
    (tmp_path / "a.txt").write_text("\n".join(docs))
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    one = build_calibration(tok, [tmp_path / "a.jsonl"], samples=6, seq_len=16, seed=3, text_field="content")
    two = build_calibration(tok, [tmp_path / "a.jsonl"], samples=6, seq_len=16, seed=3, text_field="content")
    other = build_calibration(
        tok, [tmp_path / "a.jsonl"], samples=6, seq_len=16, seed=4, text_field="content"
    )
    ds = build_calibration(tok, [tmp_path / "ds"], samples=6, seq_len=16, seed=3, text_field="content")
    txt = build_calibration(tok, [tmp_path / "a.txt"], samples=6, seq_len=16, seed=3)
    assert torch.equal(one.input_ids, two.input_ids) and one.sha256 == two.sha256
    assert one.input_ids.shape == (6, 16) and txt.input_ids.shape == (6, 16)
    assert one.sha256 != other.sha256
    assert torch.equal(ds.input_ids, one.input_ids)


@pytest.mark.parametrize(
    "family, part", [("mixtral", "self_attn.q_proj"), ("qwen3_moe", "mlp.gate"), ("mixtral", "lm_head")]
)
@pytest.mark.parametrize("stream", [False, True])
def test_missing_tensor_is_refused_not_filled_with_random_values(family, part, stream, checkpoints, tmp_path):
    """A tensor the model needs that the file lacks (an attention projection, a router, the head):
    transformers would fill it with random values and the export would carry them."""
    model = tmp_path / "m"
    shutil.copytree(checkpoints[family], model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if part in k and "experts" not in k)
    del tensors[key]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    before = tree_digest(model)
    with pytest.raises(MoeShrinkError, match="has no tensor for .*re-download") as err:
        moeshrink.prune(model, "random", keep=4, output=tmp_path / "out", stream=stream, progress=False)
    _one_line(err)
    assert tree_digest(model) == before and not (tmp_path / "out").exists()


def test_wrong_shape_tensor_is_one_line(checkpoints, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if "self_attn.o_proj" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeShrinkError, match="wrong shape") as err:
        moeshrink.prune(model, "random", keep=4, output=tmp_path / "out", progress=False)
    _one_line(err)


def _apply(model, plan, out) -> int:
    from moeshrink.cli import main

    return main(["apply", str(model), "--plan", str(plan), "-o", str(out)])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(top_k=5), "top_k 5 must be at least 1 and at most the experts each layer keeps"),
        (lambda p: p.update(top_k=0), "top_k 0 must be at least 1"),
        (lambda p: p["layers"][0]["experts"][0].update(weights=[float("nan")]), "must be finite numbers"),
        (lambda p: p["layers"][1].update(top_k=9), "layer 1: top_k 9 must be between 1 and its 4 experts"),
        (
            lambda p: p["layers"][0]["experts"][0].update(permutations=[[0, 0, 2]]),
            "every neuron index exactly once",
        ),
    ],
)
def test_hand_edited_plan_is_refused_before_anything_is_written(edit, message, checkpoints, tmp_path, capsys):
    """``apply`` used to write a broken checkpoint and exit 0 from such a plan."""
    moeshrink.prune(checkpoints["mixtral"], "random", keep=4, output=tmp_path / "a", progress=False)
    plan = json.loads((tmp_path / "a" / "moeshrink_plan.json").read_text())
    edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert _apply(checkpoints["mixtral"], tmp_path / "plan.json", tmp_path / "b") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moeshrink: error")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "b").exists()


def test_malformed_plan_is_one_line(checkpoints, tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{not json")
    assert _apply(checkpoints["mixtral"], tmp_path / "plan.json", tmp_path / "b") == 2
    assert "not a readable plan" in capsys.readouterr().err


def test_plan_of_a_fine_tune_with_the_same_shapes_is_refused(tmp_path, capsys):
    """Two checkpoints with the same config and file sizes (a model and its fine-tune): a plan made on
    one must not be applied to the other (a merge fitted on one written into the other)."""
    from moeshrink.cli import main

    one = build_tiny_model("mixtral", tmp_path / "one", seed=1)
    other = build_tiny_model("mixtral", tmp_path / "other", seed=2)
    assert (one / "config.json").read_bytes() == (other / "config.json").read_bytes()
    moeshrink.prune(one, "random", keep=4, output=tmp_path / "a", progress=False)
    plan = str(tmp_path / "a" / "moeshrink_plan.json")
    assert main(["apply", str(other), "--plan", plan, "-o", str(tmp_path / "b")]) == 2
    assert "is not the checkpoint this plan was made from" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["apply", str(one), "--plan", plan, "-o", str(tmp_path / "c")]) == 0


def test_non_utf8_jsonl_and_unknown_dtype_are_one_line(checkpoints, tmp_path, capsys):
    from moeshrink.cli import main

    bad = tmp_path / "calib.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9 \xff\xfe"}\n')
    base = [
        "prune",
        str(checkpoints["mixtral"]),
        "--method",
        "reap",
        "--keep",
        "4",
        "-o",
        str(tmp_path / "o"),
    ]
    assert main([*base, "--calib", str(bad), "--quiet"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main([*base, "--dtype", "banana", "--calib", str(bad)]) == 2
    assert "dtype" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_seq_len_beyond_the_positions_and_truncated_inspect(checkpoints, calib_file, tmp_path, capsys):
    from moeshrink.cli import main

    out = tmp_path / "o"
    args = ["prune", str(checkpoints["mixtral"]), "--method", "reap", "--keep", "4", "-o", str(out)]
    assert main([*args, "--calib", str(calib_file), "--seq-len", "100000"]) == 2
    assert "longer than the 512 positions" in capsys.readouterr().err
    model = tmp_path / "m"
    shutil.copytree(checkpoints["mixtral"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["inspect", str(model)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not out.exists()
