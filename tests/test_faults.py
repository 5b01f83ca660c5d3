"""Fault injection (issue 14): what a careless or adversarial user can do to a run, each case through the
real command line on a copy of a tiny checkpoint. Every case asserts the exit code, the one error line
(never a traceback), the input's hashes unchanged, and the output absent, complete and loadable, or
left as it was, with no hidden temporary, old copy or lock beside it.

Bad configs, shards, budgets, calibration text, recipes and plans, dangerous output paths, Ctrl-C
(a real SIGINT) at several moments, a disk that fills up (a small tmpfs; root only) and concurrent
writers run in this process; SIGKILL needs a child process (two moments by default, many behind
the slow marker). ``MOESHRINK_FAULTS_TABLE=FILE`` writes the case table as the cases run
(``benchmarks/fault_table.py`` puts it in docs/faults.md). More output-path cases (13 paths x prune,
--stream and apply) are in test_output_safety.py."""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeshrink.cli import main
from moeshrink.testbed.tiny import build_tiny_model

from .conftest import tree_digest

ABSENT, COMPLETE, KEPT, PARTIAL = "absent", "complete", "kept", "PARTIAL"
CALIB_SAMPLES = ["--samples", "4", "--seq-len", "32"]
TABLE_ENV = "MOESHRINK_FAULTS_TABLE"


@dataclass
class Env:
    """One case's world: the input (a copy of a tiny checkpoint), the output path and the files around."""

    model: Path
    out: Path
    work: Path
    calib: Path
    plan: Path
    capsys: Any = None
    notes: dict[str, Any] = field(default_factory=dict)


Argv = Callable[[Env], list[str]]
Setup = Callable[[Env, pytest.MonkeyPatch], None]


def _nothing(env: Env, mp: pytest.MonkeyPatch) -> None:
    """No setup."""


@dataclass(frozen=True)
class Case:
    """A fault and what must come of it: exit ``code``, an error line containing ``message`` (none
    when empty) and the ``output`` absent, complete or kept as it was."""

    category: str
    name: str
    argv: Argv
    code: int
    message: str = ""
    output: str = ABSENT
    setup: Setup = _nothing
    family: str = "mixtral"
    disk: bool = False  # the output (or --offload-hidden) on a small tmpfs
    second: Argv | None = None  # a second run started while the first is writing its output


# --- commands ---------------------------------------------------------------------------------------


def prune(*extra: str, method: str = "random", keep: str | None = "4") -> Argv:
    """``moeshrink prune`` of the case's input into its output."""
    budget = ["--keep", keep] if keep is not None else []
    return lambda e: ["prune", str(e.model), "--method", method, *budget, "-o", str(e.out), "--quiet", *extra]


def reap(*extra: str) -> Argv:
    """A prune that calibrates (REAP) on a few windows of the good text (``extra`` may override)."""

    def argv(e: Env) -> list[str]:
        data = [] if "--calib" in extra else ["--calib", str(e.calib)]
        return [*prune(method="reap")(e), *CALIB_SAMPLES, *data, *extra]

    return argv


def with_calib(name: str, content: bytes) -> tuple[Setup, Argv]:
    """A setup writing calibration text ``content`` to ``name`` and a REAP prune that uses it."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        (e.work / name).write_bytes(content)

    def argv(e: Env) -> list[str]:
        return [*prune(method="reap")(e), *CALIB_SAMPLES, "--calib", str(e.work / name)]

    return setup, argv


def recipe(text: str | bytes) -> tuple[Setup, Argv]:
    """A setup writing a recipe (``{model}``, ``{calib}`` filled in) and a prune that reads it."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        body = text if isinstance(text, bytes) else text.format(model=e.model, calib=e.calib).encode()
        (e.work / "recipe.yaml").write_bytes(body)

    def argv(e: Env) -> list[str]:
        return ["prune", "--recipe", str(e.work / "recipe.yaml"), "-o", str(e.out), "--quiet"]

    return setup, argv


def apply(*extra: str) -> Argv:
    """``moeshrink apply`` of the case's plan to its input."""
    return lambda e: ["apply", str(e.model), "--plan", str(e.plan), "-o", str(e.out), *extra]


# --- damage done to the input or the files around it -------------------------------------------------


def edit_config(**changes: Any) -> Setup:
    """Change (or with ``None`` remove) keys of the input's config.json."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        path = e.model / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))

    return setup


def write_file(name: str, content: bytes | None) -> Setup:
    """Overwrite (``None``: delete) a file of the input."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        if content is None:
            (e.model / name).unlink()
        else:
            (e.model / name).write_bytes(content)

    return setup


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Setup:
    """Rewrite the input's weights after ``change`` edited them in place."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        file = e.model / "model.safetensors"
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})

    return setup


def first(tensors: dict[str, torch.Tensor], *parts: str) -> str:
    """The first tensor name holding every one of ``parts`` (not an expert's unless asked)."""
    experts = any("experts" in p for p in parts)
    return next(k for k in sorted(tensors) if all(p in k for p in parts) and (experts or "experts" not in k))


def drop(*parts: str) -> Setup:
    """Remove the first tensor whose name holds every one of ``parts``."""
    return edit_tensors(lambda t: t.pop(first(t, *parts)))


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    """A NaN in an expert's weights."""
    tensors[first(tensors, "experts.3")][0, 0] = float("nan")


def _narrow(tensors: dict[str, torch.Tensor]) -> None:
    """An attention projection one column short."""
    key = first(tensors, "self_attn.o_proj")
    tensors[key] = tensors[key][:, :-1].contiguous()


def _extra(tensors: dict[str, torch.Tensor]) -> None:
    """A tensor the model has no place for."""
    tensors["model.layers.0.mlp.unexpected.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)


def truncate(cut: int) -> Setup:
    """Cut the last ``cut`` bytes off the weights file."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        file = e.model / "model.safetensors"
        file.write_bytes(file.read_bytes()[:-cut])

    return setup


def sharded(then: Setup = _nothing) -> Setup:
    """Re-save the input as two shards with an index (as real checkpoints are), then ``then``."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        tensors = load_file(e.model / "model.safetensors")
        (e.model / "model.safetensors").unlink()
        keys = sorted(tensors)
        weight_map = {}
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
            name = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({k: tensors[k] for k in part}, e.model / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (e.model / "model.safetensors.index.json").write_text(json.dumps(index))
        then(e, mp)

    return setup


def _index_swapped(e: Env, mp: pytest.MonkeyPatch) -> None:
    """The index names the wrong shard for one tensor."""
    path = e.model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    path.write_text(json.dumps(index))


def _bin_only(e: Env, mp: pytest.MonkeyPatch) -> None:
    """The weights as pytorch_model.bin only."""
    torch.save(load_file(e.model / "model.safetensors"), e.model / "pytorch_model.bin")
    (e.model / "model.safetensors").unlink()


def _dense(e: Env, mp: pytest.MonkeyPatch) -> None:
    """A dense (Llama) checkpoint in place of the MoE one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shutil.rmtree(e.model)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=512
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(e.model)


def _no_model(e: Env, mp: pytest.MonkeyPatch) -> None:
    """No checkpoint folder at all."""
    shutil.rmtree(e.model)


def _another_checkpoint(e: Env, mp: pytest.MonkeyPatch) -> None:
    """Same config and file sizes, other weights (a fine-tune): the plan was made on the first."""
    shutil.rmtree(e.model)
    build_tiny_model("mixtral", e.model, seed=2)


def edit_plan(change: Callable[[dict], Any]) -> Setup:
    """Hand-edit the case's copy of the plan."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        plan = json.loads(e.plan.read_text())
        change(plan)
        e.plan.write_text(json.dumps(plan))

    return setup


def plan_text(content: str) -> Setup:
    """Replace the case's plan by ``content``."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        e.plan.write_text(content)

    return setup


def expert(layer: int = 0, index: int = 0) -> Callable[[dict], dict]:
    """The plan entry of new expert ``index`` in layer ``layer``."""
    return lambda p: p["layers"][layer]["experts"][index]


# --- outputs that exist before the run and paths around the input -----------------------------------


def existing_output(e: Env, mp: pytest.MonkeyPatch) -> None:
    """An earlier result at the output path (with a file the new run does not write)."""
    shutil.copytree(e.model, e.out)
    (e.out / "keep-me.txt").write_text("precious")


def output_is_file(e: Env, mp: pytest.MonkeyPatch) -> None:
    """A file (not a folder) at the output path."""
    e.out.write_text("a file, not a folder")


def output_at(where: Callable[[Env], Path]) -> Setup:
    """The output at ``where(env)``."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        e.out = where(e)

    return setup


def _input_via_link(e: Env, mp: pytest.MonkeyPatch) -> None:
    """The output: a symlink to the input."""
    link = e.work / "link"
    link.symlink_to(e.model, target_is_directory=True)
    e.out = link


def _cwd_inside_input(e: Env, mp: pytest.MonkeyPatch) -> None:
    """Run from inside the input with ``-o .``."""
    mp.chdir(e.model)
    e.out = Path(".")


# --- faults during the run ---------------------------------------------------------------------------


def at_call(target: str, action: Callable[[Env], None], nth: int = 1, after: bool = False) -> Setup:
    """Call ``action`` when ``module.attribute`` (``target``) is called the ``nth`` time (before the
    call, or just after it)."""
    module_name, _, attribute = target.rpartition(".")

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        owner = _resolve(module_name)
        original = getattr(owner, attribute)
        calls = itertools.count(1)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            hit = next(calls) == nth
            if hit and not after:
                action(e)
            result = original(*args, **kwargs)
            if hit and after:
                action(e)
            return result

        mp.setattr(owner, attribute, hooked)

    return setup


def _resolve(dotted: str) -> Any:
    """A module or a class inside one, by dotted name."""
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def interrupt(e: Env) -> None:
    """Ctrl-C: a real SIGINT to this process (Python raises KeyboardInterrupt where it lands)."""
    signal.raise_signal(signal.SIGINT)


def second_run(e: Env) -> None:
    """Start the case's second run now, while the first holds its output (in the middle of writing)."""
    before = e.capsys.readouterr()
    code = main(e.notes["second"](e))
    err = e.capsys.readouterr().err
    e.notes["second_result"] = (code, err)
    sys.stderr.write(before.err)


def fill_disk(leave: Callable[[int], int]) -> Setup:
    """After the free-disk check passed (for ``needed`` bytes), fill the disk to ``leave(needed)`` bytes
    free: another program filling it while the run writes."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        import moeshrink.job
        import moeshrink.pipeline

        original = moeshrink.job.check_free_disk

        def check_then_fill(output: Path, needed: int) -> None:
            original(output, needed)
            fill(e.notes["disk"], leave(needed))

        for module in (moeshrink.job, moeshrink.pipeline):
            mp.setattr(module, "check_free_disk", check_then_fill, raising=False)

    return setup


def fill(disk: Path, leave: int) -> None:
    """Write a ballast file so that ``disk`` has about ``leave`` bytes free."""
    free = shutil.disk_usage(disk).free
    with (disk / "ballast").open("ab") as f:
        f.write(b"\0" * max(free - leave, 0))


def on_disk(e: Env, mp: pytest.MonkeyPatch) -> None:
    """The output on the small disk."""
    e.out = e.notes["disk"] / "out"


def both(*setups: Setup) -> Setup:
    """Run ``setups`` in order."""

    def setup(e: Env, mp: pytest.MonkeyPatch) -> None:
        for s in setups:
            s(e, mp)

    return setup


def _hidden_on_disk(e: Env, mp: pytest.MonkeyPatch) -> None:
    """Leave 32 KiB free on the small disk (where --offload-hidden puts the hidden states)."""
    fill(e.notes["disk"], 32 << 10)


# --- the table ---------------------------------------------------------------------------------------

bad_calib = {
    "missing file": (lambda e, mp: None, reap("--calib", "/nonexistent/calib.txt")),
    "empty text": with_calib("empty.txt", b"  \n"),
    "too short": with_calib("short.txt", b"Only a few words here."),
    "binary .txt (NUL bytes)": with_calib("calib.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 64),
    "Latin-1 .txt": with_calib("calib.txt", "Café crème, naïve façade. ".encode("latin-1") * 400),
    "UTF-16 .txt": with_calib("calib.txt", ("Some text in UTF-16. " * 400).encode("utf-16")),
    "non-UTF-8 JSONL": with_calib("calib.jsonl", b'{"text": "caf\xe9 \xff\xfe"}\n'),
    "malformed JSONL line": with_calib("calib.jsonl", b'{"text": "fine"}\n{"text": broken\n'),
    "JSONL without the text field": with_calib("calib.jsonl", b'{"body": "x"}\n'),
}
CALIB_MESSAGES = {
    "missing file": "calibration file not found",
    "empty text": "calibration text is empty",
    "too short": "calibration text too short",
    "binary .txt (NUL bytes)": "not text (a NUL byte at byte 8",
    "Latin-1 .txt": "not UTF-8 text (byte 3",
    "UTF-16 .txt": "not text (a NUL byte",
    "non-UTF-8 JSONL": "not UTF-8 text (byte 13",
    "malformed JSONL line": "calib.jsonl:2: not valid JSON",
    "JSONL without the text field": "no text field 'text'; choose the field with --calib-field",
}

bad_recipes = {
    "missing recipe": (b"", "recipe not found"),
    "not YAML": (b"model: [unclosed\n", "not valid YAML"),
    "not UTF-8": (b"model: caf\xe9\nmethod: random\n", "not UTF-8"),
    "a list, not a mapping": (b"- random\n- 4\n", "recipe"),
    "unknown field": ("model: {model}\nmethod: random\nkeep: 4\nkepp: 3\n", "kepp"),
    "wrong type": ("model: {model}\nmethod: random\nkeep: four\n", "keep"),
    "step with two kinds": (
        "model: {model}\nsteps:\n  - top_k: 1\n    experts: {{method: random, keep: 4}}\n",
        "exactly one kind",
    ),
    "unknown method": ("model: {model}\nmethod: nope\nkeep: 4\n", "unknown method 'nope'"),
    "total sparsity before the experts step": (
        "model: {model}\nsteps:\n  - sparsify: {{total_sparsity: 0.6}}\n  - experts: {{method: random, keep: 4}}\n",
        "after the experts step",
    ),
}


def _recipe_case(name: str) -> Case:
    """The case of ``bad_recipes[name]``."""
    text, message = bad_recipes[name]
    setup, argv = recipe(text)
    if name == "missing recipe":
        setup = _nothing
    return Case("recipe", name, argv, 2, message, setup=setup)


# fmt: off
CASES: list[Case] = [
    # configs
    Case("config", "model directory missing", prune(), 2, "model directory not found", setup=_no_model),
    Case("config", "config.json missing", prune(), 2, "has no config.json", setup=write_file("config.json", None)),
    Case("config", "config.json not JSON", prune(), 2, "is not valid JSON", setup=write_file("config.json", b"{oops")),
    Case("config", "unknown model_type", prune(), 2, "my_new_moe", setup=edit_config(model_type="my_new_moe")),
    Case("config", "dense model (llama)", prune(), 2, "'llama' is not a mixture-of-experts model", setup=_dense),
    Case("config", "top-k above the experts", prune(), 2, "num_experts_per_tok 9 is more than the 8 experts", setup=edit_config(num_experts_per_tok=9)),
    Case("config", "fewer experts than the weights", prune(), 2, "config.json", setup=edit_config(num_local_experts=6)),
    Case("config", "fewer experts than the weights, --stream", prune("--stream"), 2, "config.json", setup=edit_config(num_local_experts=6)),
    Case("config", "fewer layers than the weights", prune(), 2, "has no place for", setup=edit_config(num_hidden_layers=2)),
    Case("config", "fewer layers than the weights, --stream", prune("--stream"), 2, "has no place for", setup=edit_config(num_hidden_layers=2)),
    Case("config", "more layers than the weights", prune(), 2, "has no tensor for", setup=edit_config(num_hidden_layers=4)),
    Case("config", "hidden size unlike the weights", prune(), 2, "wrong shape", setup=edit_config(hidden_size=96)),
    # shards
    Case("shard", "missing shard", prune(), 2, "is missing", setup=sharded(write_file("model-00002-of-00002.safetensors", None))),
    Case("shard", "index puts a tensor in the wrong shard", prune(), 2, "that shard does not hold it", setup=sharded(_index_swapped)),
    Case("shard", "index not JSON", prune(), 2, "not a readable index", setup=sharded(write_file("model.safetensors.index.json", b"{"))),
    Case("shard", "truncated weights", prune(), 2, "truncated", setup=truncate(1000)),
    Case("shard", "garbage header", prune(), 2, "re-download", setup=write_file("model.safetensors", b"\xff" * 64)),
    Case("shard", "empty weight file", prune(), 2, "re-download", setup=write_file("model.safetensors", b"")),
    Case("shard", "no weight files", prune(), 2, "no model.safetensors", setup=write_file("model.safetensors", None)),
    Case("shard", "only pytorch_model.bin", prune(), 2, "convert them to safetensors", setup=_bin_only),
    Case("shard", "NaN in an expert", prune(), 2, "contains NaN or inf", setup=edit_tensors(_nan)),
    Case("shard", "attention tensor missing", prune(), 2, "has no tensor for", setup=drop("self_attn.q_proj")),
    Case("shard", "router missing (qwen3_moe)", prune(), 2, "has no tensor for", setup=drop("mlp.gate."), family="qwen3_moe"),
    Case("shard", "router missing, --stream (qwen3_moe)", prune("--stream"), 2, "has no tensor for", setup=drop("mlp.gate."), family="qwen3_moe"),
    Case("shard", "LM head missing (olmoe)", prune(), 2, "has no tensor for", setup=drop("lm_head"), family="olmoe"),
    Case("shard", "tensor of the wrong shape", prune(), 2, "wrong shape", setup=edit_tensors(_narrow)),
    Case("shard", "unexpected tensor", prune(), 2, "has no place for", setup=edit_tensors(_extra)),
    Case("shard", "unexpected tensor, --stream", prune("--stream"), 2, "do not fit the model", setup=edit_tensors(_extra)),
    # budgets
    Case("budget", "keep every expert", prune(keep="8"), 2, "removes nothing"),
    Case("budget", "keep more than there are", prune(keep="9"), 2, "removes nothing"),
    Case("budget", "keep 0", prune(keep="0"), 2, "at least 1"),
    Case("budget", "keep fewer than top-k", prune(keep="1"), 2, "fewer than the 2 each token uses"),
    Case("budget", "ratio above 1", prune("--ratio", "1.5", keep=None), 2, "must be in (0, 1)"),
    Case("budget", "top-k 0", prune("--top-k", "0"), 2, "(--top-k): Input should be greater than or equal to 1"),
    Case("budget", "top-k above the experts kept", prune("--top-k", "5"), 2, "fewer than the 5 each token uses"),
    Case("budget", "grouped routing, keep 5 (deepseek_v3)", prune(keep="5"), 2, "multiple of 2", family="deepseek_v3"),
    Case("budget", "top-k of a fixed-top-k family (phimoe)", prune("--top-k", "1"), 2, "cannot be changed", family="phimoe"),
    Case("budget", "sparsity above 1", prune("--sparsity", "1.5"), 2, "sparsity"),
    Case("budget", "N:M with N above M", prune("--nm", "5:4"), 2, "5:4"),
    Case("budget", "unknown method", prune(method="nope"), 2, "unknown method 'nope'"),
    Case("budget", "unknown --dtype", prune("--dtype", "banana"), 2, "dtype"),
    # calibration text
    Case("calibration", "method that needs data, no --calib", prune(method="reap"), 2, "needs calibration text"),
    Case("calibration", "--seq-len beyond the positions", reap("--seq-len", "1024"), 2, "longer than the 512 positions"),
    Case("calibration", "--samples 0", reap("--samples", "0"), 2, "samples"),
    *(Case("calibration", name, argv, 2, CALIB_MESSAGES[name], setup=setup) for name, (setup, argv) in bad_calib.items()),
    # recipes
    *(_recipe_case(name) for name in bad_recipes),
    # output paths (more in test_output_safety.py)
    Case("output", "output is the input", prune("--overwrite"), 2, "is the input checkpoint", KEPT, setup=output_at(lambda e: e.model)),
    Case("output", "output is the input, --stream", prune("--overwrite", "--stream"), 2, "is the input checkpoint", KEPT, setup=output_at(lambda e: e.model)),
    Case("output", "output is a symlink to the input", prune("--overwrite"), 2, "is the input checkpoint", KEPT, setup=_input_via_link),
    Case("output", "output contains the input", prune("--overwrite"), 2, "contains the input checkpoint", KEPT, setup=output_at(lambda e: e.model.parent)),
    Case("output", "output inside the input", prune("--overwrite"), 2, "is inside the input checkpoint", setup=output_at(lambda e: e.model / "sub")),
    Case("output", "-o . from inside the input", prune("--overwrite"), 2, "is the input checkpoint", KEPT, setup=_cwd_inside_input),
    Case("output", "apply onto the input", apply("--overwrite"), 2, "is the input checkpoint", KEPT, setup=output_at(lambda e: e.model)),
    Case("output", "output is a file", prune("--overwrite"), 2, "is not a directory", KEPT, setup=output_is_file),
    Case("output", "output exists, no --overwrite", prune(), 2, "already exists", KEPT, setup=existing_output),
    Case("output", "output exists, --overwrite", prune("--overwrite"), 0, output=COMPLETE, setup=existing_output),
    Case("output", "sibling sharing the name prefix", prune(), 0, output=COMPLETE, setup=output_at(lambda e: e.model.parent / "model-small")),
    # hand-edited plans
    Case("plan", "top_k above the experts kept", apply(), 2, "top_k 5 must be at least 1", setup=edit_plan(lambda p: p.update(top_k=5))),
    Case("plan", "top_k 0", apply(), 2, "top_k 0 must be at least 1", setup=edit_plan(lambda p: p.update(top_k=0))),
    Case("plan", "NaN merge weight", apply(), 2, "must be finite numbers", setup=edit_plan(lambda p: expert()(p).update(weights=[float("nan")]))),
    Case("plan", "neurons not a permutation", apply(), 2, "every neuron index exactly once", setup=edit_plan(lambda p: expert()(p).update(permutations=[[0, 0, 2]]))),
    Case("plan", "source expert out of range", apply(), 2, "a source expert is outside 0..7", setup=edit_plan(lambda p: expert()(p).update(sources=[99]))),
    Case("plan", "expert with no source", apply(), 2, "source", setup=edit_plan(lambda p: expert()(p).update(sources=[], weights=[]))),
    Case("plan", "a layer missing", apply(), 2, "layer", setup=edit_plan(lambda p: p["layers"].pop())),
    Case("plan", "unknown format", apply(), 2, "format", setup=edit_plan(lambda p: p.update(format="moeshrink-plan/9"))),
    Case("plan", "not JSON", apply(), 2, "not a readable plan", setup=plan_text("{not json")),
    Case("plan", "plan of another checkpoint (same shapes)", apply(), 2, "is not the checkpoint this plan was made from", setup=_another_checkpoint),
    Case("plan", "plan of another family", apply(), 2, "is not the checkpoint this plan was made from", family="qwen3_moe"),
    # Ctrl-C
    Case("signal", "SIGINT while loading", prune(), 130, "interrupted", setup=at_call("moeshrink.job.load_model", interrupt)),
    Case("signal", "SIGINT during calibration", reap(), 130, "interrupted", setup=at_call("moeshrink.engine.runner.run_layer", interrupt, nth=2)),
    Case("signal", "SIGINT during the export", prune(), 130, "interrupted", setup=at_call("moeshrink.io.export.write_extras", interrupt)),
    Case("signal", "SIGINT mid-write, --stream", prune("--stream"), 130, "interrupted", setup=at_call("moeshrink.io.streaming.ShardWriter.write", interrupt, nth=2)),
    Case("signal", "SIGINT while replacing an output", prune("--overwrite"), 130, "interrupted", KEPT, setup=both(existing_output, at_call("moeshrink.io.export.write_extras", interrupt))),
    # concurrent writers
    Case("concurrent", "second run while the first writes", prune(), 0, output=COMPLETE, setup=at_call("moeshrink.io.export.write_extras", second_run), second=prune("--overwrite")),
    Case("concurrent", "second run (--stream) while the first writes (--stream)", prune("--stream"), 0, output=COMPLETE, setup=at_call("moeshrink.io.streaming.ShardWriter.write", second_run, nth=2), second=prune("--stream", "--overwrite")),
    Case("concurrent", "apply while a prune writes", prune(), 0, output=COMPLETE, setup=at_call("moeshrink.io.export.write_extras", second_run), second=apply("--overwrite")),
    # a disk that fills up (a 16 MiB tmpfs)
    Case("disk", "too little free disk (pre-check)", prune(), 2, "not enough free disk", disk=True, setup=both(on_disk, lambda e, mp: fill(e.notes["disk"], 2 << 20))),
    Case("disk", "small output on a small disk (no fixed 64 MiB)", prune(), 0, output=COMPLETE, disk=True, setup=on_disk),
    Case("disk", "disk fills up during the write", prune(), 2, "the disk filled up while writing", disk=True, setup=both(on_disk, fill_disk(lambda n: n // 2))),
    Case("disk", "disk fills up mid-write, --stream", prune("--stream"), 2, "the disk filled up while writing", disk=True, setup=both(on_disk, fill_disk(lambda n: n // 2))),
    Case("disk", "disk fills up during apply", apply(), 2, "the disk filled up while writing", disk=True, setup=both(on_disk, fill_disk(lambda n: n // 2))),
    Case("disk", "disk fills up while replacing an output", prune("--overwrite"), 2, "the disk filled up while writing", KEPT, disk=True, setup=both(on_disk, existing_output, fill_disk(lambda n: n // 2))),
    Case("disk", "--offload-hidden on a full disk", lambda e: [*reap()(e), "--samples", "16", "--seq-len", "64", "--offload-hidden", str(e.notes["disk"] / "hidden")], 2, "--offload-hidden", disk=True, setup=_hidden_on_disk),
]
# fmt: on


# --- running a case ----------------------------------------------------------------------------------

ROWS: list[dict[str, str]] = []


def snapshot(path: Path) -> dict[str, str] | None:
    """Hashes of everything at ``path`` (a folder or a file); None when nothing is there."""
    if path.is_dir():
        return tree_digest(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return None


def output_state(out: Path, before: dict[str, str] | None) -> str:
    """absent, kept (as it was before the run), complete (a checkpoint that loads) or PARTIAL."""
    from moeshrink.io.checkpoint import load_model

    now = snapshot(out)
    if now is None:
        return ABSENT
    if now == before:
        return KEPT
    try:
        load_model(out)
    except Exception:  # the table reports it; the test fails on it
        return PARTIAL
    return COMPLETE


def leftovers(out: Path) -> list[str]:
    """Hidden temporaries, old copies and locks of ``out`` beside it, and calibration spills."""
    parent = out.absolute().parent
    found = [p.name for p in parent.glob(f".{out.absolute().name}.*")] if parent.is_dir() else []
    return sorted(found)


def spilled(env: Env) -> list[Path]:
    """Calibration hidden states left in the --offload-hidden folder of the disk cases."""
    hidden = env.notes.get("disk", env.work) / "hidden"
    return list(hidden.iterdir()) if hidden.is_dir() else []


def record(
    category: str,
    name: str,
    family: str,
    code: str,
    message: str,
    intact: bool,
    output: str,
    env: Env,
    base: Path,
    verdict: str,
) -> None:
    """One row of the case table (paths shortened so the table does not change from run to run)."""
    for path, short in ((env.work, "CASE"), (base, "TMP")):
        message = message.replace(str(path.resolve()), short).replace(str(path), short)
    message = message.removeprefix("moeshrink: error: ").removeprefix("moeshrink: ")
    ROWS.append(
        {
            "category": category,
            "case": name,
            "family": family,
            "exit": code,
            "message": message if len(message) <= 140 else message[:139] + "…",
            "input intact": "yes" if intact else "NO",
            "output": output,
            "verdict": verdict,
        }
    )


def described(state: str, left: list[str]) -> str:
    """An output state with what was left beside it."""
    return state + (f" + {len(left)} left over" if left else "")


def write_table(path: Path) -> None:
    """The case table as Markdown."""
    columns = ["category", "case", "family", "exit", "message", "input intact", "output", "verdict"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in ROWS:
        lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in columns) + " |")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", autouse=True)
def case_table() -> Iterator[None]:
    """With MOESHRINK_FAULTS_TABLE set, write the rows of the cases that ran to that file."""
    ROWS.clear()
    yield
    if os.environ.get(TABLE_ENV):
        write_table(Path(os.environ[TABLE_ENV]))


@pytest.fixture(scope="module")
def plan_source(checkpoints: dict[str, Path], tmp_path_factory) -> Path:
    """A plan made from the mixtral checkpoint (each case edits a copy)."""
    out = tmp_path_factory.mktemp("fault-plan") / "pruned"
    assert (
        main(
            [
                "prune",
                str(checkpoints["mixtral"]),
                "--method",
                "random",
                "--keep",
                "4",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    return out / "moeshrink_plan.json"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: the output's file system in the disk-full cases (mounting one needs root)."""
    if os.geteuid() != 0:
        pytest.skip("the disk-full cases mount a small tmpfs, which needs root; run them as root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the disk-full cases need one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def make_env(case_family: str, checkpoints: dict[str, Path], calib: Path, plan: Path, tmp_path: Path) -> Env:
    """A fresh copy of the family's checkpoint and of the plan, and an output path beside them."""
    work = tmp_path
    model = work / "model"
    shutil.copytree(checkpoints[case_family], model)
    shutil.copy2(plan, work / "plan.json")
    return Env(model=model, out=work / "out", work=work, calib=calib, plan=work / "plan.json")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}: {c.name}" for c in CASES])
def test_fault(
    case: Case, checkpoints, calib_file, plan_source, tmp_path, tmp_path_factory, monkeypatch, capsys, request
):
    """The case's fault through the real command line: exit code, one error line, input, output."""
    env = make_env(case.family, checkpoints, calib_file, plan_source, tmp_path)
    env.capsys = capsys
    if case.disk:
        env.notes["disk"] = request.getfixturevalue("small_disk")
    if case.second is not None:
        env.notes["second"] = case.second
    try:
        case.setup(env, monkeypatch)
    except Exception as e:  # a hook point this version lacks (the table of an older version)
        record(case.category, case.name, case.family, "-", "", True, "-", env, tmp_path, f"not set up: {e!r}")
        raise
    argv = case.argv(env)
    out = env.out.absolute()  # before the working directory is restored
    before_in, before_out = snapshot(env.model), snapshot(out)
    capsys.readouterr()
    raised = ""
    # as from a terminal: a suite started in the background by a shell without job control has SIGINT
    # ignored, and the SIGINT cases' signal would not interrupt the run
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    except BaseException as e:  # a traceback (Ctrl-C included: it must not stop the session)
        code, raised = 1, f"traceback: {type(e).__name__}: {' '.join(str(e).split())}"
    finally:
        signal.signal(signal.SIGINT, previous)
    if leftovers(out) or spilled(env):  # what the process's exit does: dropped writers clean up (0.5 s)
        gc.collect()
    err = capsys.readouterr().err
    monkeypatch.undo()  # the hooks (and a changed working directory) go before the output is read
    errors = [line for line in err.splitlines() if line.startswith("moeshrink:")]
    traceback = raised or ("traceback" if "Traceback" in err else "")
    intact = snapshot(env.model) == before_in
    state, left = output_state(out, before_out), leftovers(out)
    second = env.notes.get("second_result")

    problems = []
    if traceback:
        problems.append("a traceback")
    if code != case.code:
        problems.append(f"exit {code}, not {case.code}")
    if case.message and not (len(errors) == 1 and case.message in errors[0]):
        problems.append(f"no one error line with {case.message!r}")
    elif case.message and err.rstrip("\n").splitlines()[-1] != errors[0]:
        problems.append("the message goes on after its first line")
    elif not case.message and errors:
        problems.append("an error line")
    if not intact:
        problems.append("THE INPUT CHANGED")
    if state != case.output:
        problems.append(f"output {state}, not {case.output}")
    if left:
        problems.append(f"left beside the output: {', '.join(left)}")
    if case.second is not None and not (second and second[0] == 2 and "another moeshrink run" in second[1]):
        problems.append(f"the second run did not fail clearly: {second}")
    if case.disk:  # nothing else on the small disk: no temporary, no spilled hidden states
        others = [p.name for p in env.notes["disk"].iterdir() if p.name not in ("ballast", "out", "hidden")]
        if others or spilled(env):
            problems.append(f"left on the disk: {others + [p.name for p in spilled(env)]}")

    message = errors[0] if errors else traceback
    code_text = str(code)
    if second is not None:
        code_text += f" (2nd run: {second[0]})"
        lines = [line for line in second[1].splitlines() if line.startswith("moeshrink:")]
        message = "2nd run: " + (lines[0] if lines else "no message").removeprefix("moeshrink: error: ")
    record(
        case.category,
        case.name,
        case.family,
        code_text,
        message,
        intact,
        described(state, left),
        env,
        tmp_path_factory.getbasetemp(),
        "; ".join(problems) or "ok",
    )
    assert not problems, f"{problems}\n{err}"


# --- SIGKILL: a child process killed at a chosen moment ------------------------------------------------

# Runs the command line with ``module.attribute`` (argv[1]) wrapped to SIGKILL the process at its
# argv[2]-th call, before it or just after (argv[3]); an empty target kills nothing (the test kills
# the child a delay after it says it has imported everything and starts the run).
CHILD = """
import importlib, itertools, os, signal, sys
target, nth, when, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
if target:
    dotted, _, attribute = target.rpartition(".")
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            owner = getattr(owner, name)
        break
    original, calls = getattr(owner, attribute), itertools.count(1)

    def hooked(*args, **kwargs):
        hit = next(calls) == nth
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attribute, hooked)
from moeshrink.cli import main
print(READY, file=sys.stderr, flush=True)
sys.exit(main(argv))
"""
READY = "fault-child: imported, running"
CHILD = CHILD.replace("READY", repr(READY))


@dataclass(frozen=True)
class Kill:
    """SIGKILL at the ``nth`` call of ``target`` (before or ``after`` it), or ``delay`` seconds in."""

    name: str
    argv: Argv
    target: str = ""
    nth: int = 1
    after: bool = False
    delay: float = 0.0
    existing: bool = False  # an earlier output at the path, replaced with --overwrite
    slow: bool = True


EXPORT = "moeshrink.io.export"
SHARD = "moeshrink.io.streaming.ShardWriter.write"
# fmt: off
KILLS: list[Kill] = [
    Kill("SIGKILL during the export (weights written, before the plan)", prune(), f"{EXPORT}.write_extras", slow=False),
    Kill("SIGKILL mid-write, --stream (after the first layer)", prune("--stream"), SHARD, nth=2, slow=False),
    Kill("SIGKILL while loading", prune(), "moeshrink.job.load_model"),
    Kill("SIGKILL during calibration", reap(), "moeshrink.engine.runner.run_layer", nth=2),
    Kill("SIGKILL just before the rename into place", prune(), f"{EXPORT}.replace_directory"),
    Kill("SIGKILL just after the rename into place", prune(), f"{EXPORT}.replace_directory", after=True),
    Kill("SIGKILL replacing an output, before the swap", prune("--overwrite"), f"{EXPORT}.replace_directory", existing=True),
    Kill("SIGKILL replacing an output, between the swap and removing the old", prune("--overwrite"), f"{EXPORT}._exchange", after=True, existing=True),
    *(Kill(f"SIGKILL at shard {n} of 4, --stream", prune("--stream"), SHARD, nth=n) for n in (1, 3, 4)),
    Kill("SIGKILL writing the rest, --stream", prune("--stream"), "moeshrink.io.streaming.write_extras"),
    *(
        Kill(f"SIGKILL {delay:g} s into a REAP run{', --stream' if stream else ''}", reap("--samples", "16", "--seq-len", "64", *(["--stream"] if stream else [])), delay=delay)
        for stream in (False, True)
        for delay in (0.05, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0)
    ),
]
# fmt: on


@pytest.mark.parametrize(
    "kill", [pytest.param(k, id=k.name, marks=[pytest.mark.slow] if k.slow else []) for k in KILLS]
)
def test_killed(kill: Kill, checkpoints, calib_file, plan_source, tmp_path, tmp_path_factory, capsys):
    """SIGKILL leaves no chance to clean up: the input is unchanged, the output absent, complete or as
    it was, and the next run (--overwrite) succeeds and removes what the killed one left."""
    env = make_env("mixtral", checkpoints, calib_file, plan_source, tmp_path)
    if kill.existing:
        existing_output(env, pytest.MonkeyPatch())
    argv = kill.argv(env)
    before_in, before_out = snapshot(env.model), snapshot(env.out)
    child = [
        sys.executable,
        "-c",
        CHILD,
        kill.target,
        str(kill.nth),
        "after" if kill.after else "before",
        *argv,
    ]
    environment = {**os.environ, "MOESHRINK_VERIFY": "0"}
    # as from a terminal: a suite started in the background by a shell without job control inherits
    # SIGINT ignored, and the child would run to the end instead of being interrupted
    run = subprocess.Popen(
        child,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    started = ""
    while kill.delay and READY not in started and run.poll() is None:  # the delay counts from the run
        started = run.stderr.readline() or started
    try:
        _, err = run.communicate(timeout=kill.delay or 300)
    except subprocess.TimeoutExpired:
        run.kill()
        _, err = run.communicate()
    lines = [line for line in err.splitlines() if line.strip() and READY not in line]
    state, left = output_state(env.out, before_out), leftovers(env.out)
    intact = snapshot(env.model) == before_in
    capsys.readouterr()
    rerun = main([*prune("--overwrite")(env)])
    after_state, after_left = output_state(env.out, None), leftovers(env.out)

    problems = []
    if not intact:
        problems.append("THE INPUT CHANGED")
    if run.returncode != -signal.SIGKILL and not (kill.delay and run.returncode == 0):  # it may finish first
        problems.append(f"exit {run.returncode}, not killed")
    if "Traceback" in err:
        problems.append("a traceback")
    if state not in (ABSENT, COMPLETE, KEPT):
        problems.append(f"output {state}")
    if rerun != 0 or after_state != COMPLETE or after_left:
        problems.append(f"the rerun exits {rerun}: {described(after_state, after_left)}")
    record(
        "SIGKILL",
        kill.name,
        "mixtral",
        str(run.returncode),
        {-signal.SIGKILL: "(killed: no message)", 0: "(finished before the kill)"}.get(
            run.returncode, lines[-1] if lines else "no message"
        ),
        intact,
        f"{described(state, left)}; the rerun exits {rerun}: {described(after_state, after_left)}",
        env,
        tmp_path_factory.getbasetemp(),
        "; ".join(problems) or "ok",
    )
    assert not problems, f"{problems}\n{err}"
