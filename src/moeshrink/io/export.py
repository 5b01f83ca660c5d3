"""Write a compressed model as a standard Hugging Face checkpoint, atomically.

Everything is written into a hidden temporary directory beside the output and renamed into place
when complete, so a crash never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeshrink.arch import FamilyAdapter
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import TOKENIZER_FILES, find_extra
from moeshrink.plan import LEGACY_REFIT_FILENAME, PLAN_FILENAME, REFIT_FILENAME, ModelPlan
from moeshrink.serving import is_per_layer, mark_per_layer_architecture


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (both resolved) name the same directory, also through bind mounts or a
    case-insensitive file system."""
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_source(output: str | Path, source: str | Path) -> None:
    """Refuse an ``output`` that is the input checkpoint ``source``, contains it or lies inside it.

    Writing the output replaces the whole output directory, and its temporary directory is made beside
    it, so any of the three would delete or litter the input. Paths are compared fully resolved
    (symlinks, ``.``/``..``, relative paths). A ``source`` that does not exist has nothing to lose
    (its own error comes later)."""
    src = Path(source).resolve()
    if not src.exists():
        return
    out = Path(output).resolve()
    if _same_path(out, src):
        raise MoeShrinkError(
            f"output directory {output} is the input checkpoint {src}: moeshrink never modifies its input; "
            "choose another output directory"
        )
    if any(_same_path(out, parent) for parent in src.parents):
        raise MoeShrinkError(
            f"output directory {output} contains the input checkpoint {src} and would replace it: "
            "choose an output directory outside the input"
        )
    if any(_same_path(parent, src) for parent in out.parents):
        raise MoeShrinkError(
            f"output directory {output} is inside the input checkpoint {src}: moeshrink never writes into "
            "its input; choose an output directory outside the input"
        )


def check_output_dir(output: str | Path, overwrite: bool, *, source: str | Path | None = None) -> Path:
    """Refuse an output that is, contains or lies inside the input checkpoint ``source`` (even with
    ``overwrite``), and an existing output unless ``overwrite``; make sure its parent can be written."""
    if source is not None:
        check_not_source(output, source)
    output = Path(output)
    if output.exists() and not overwrite:
        raise MoeShrinkError(f"output directory {output} already exists: choose another or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise MoeShrinkError(f"output {output} exists and is not a directory: choose another path")
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise MoeShrinkError(f"cannot write into {parent}: choose a writable output directory")
    return output


def temporary_directory(output: Path) -> Path:
    """A new hidden directory beside ``output`` (same file system, so renaming it into place is atomic)."""
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_directory(tmp: Path, output: Path) -> None:
    """Rename the finished ``tmp`` to ``output``, replacing what was there."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(
    output: str | Path, overwrite: bool = False, *, source: str | Path | None = None
) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``output``, on failure it is removed.

    ``source``: the input checkpoint, which the output may not be, contain or lie inside."""
    output = check_output_dir(output, overwrite, source=source)
    tmp = temporary_directory(output)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, output)


def write_config_aliases(directory: Path, adapter: FamilyAdapter, num_experts: int, top_k: int) -> None:
    """Write every expert-count alias into config.json: stacks differ in which one they read."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key in adapter.expert_count_keys:
        config[key] = num_experts
    config["num_experts_per_tok"] = top_k
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(source: Path | None, directory: Path, tokenizer=None) -> None:
    copied = False
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, directory / name)
                copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(directory)


def export_checkpoint(
    model: nn.Module,
    adapter: FamilyAdapter,
    plan: ModelPlan,
    output: str | Path,
    *,
    source: Path | None = None,
    tokenizer=None,
    model_card: str | None = None,
    overwrite: bool = False,
    sidecars: dict[str, dict[str, torch.Tensor]] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` with per-expert keys (transformers' original on-disk format), the tokenizer,
    the plan and a model card to ``output``.

    With different expert counts per layer the tensors are saved fused (the layout in memory, which
    needs no per-family key conversion) and config.json lists the counts; ``moeshrink.load_model``
    reloads such a checkpoint exactly. Per-layer counts or top-k name the architecture
    ``Moeshrink<Original>`` (see :mod:`moeshrink.serving`), which vLLM serves through moeshrink's
    plugin. ``sidecars`` are further safetensors files written inside the same atomic directory (e.g.
    the exact router transfer)."""
    counts = plan.num_experts_after
    uniform = len(set(counts)) == 1
    with atomic_directory(output, overwrite, source=source) as tmp:
        model.save_pretrained(tmp, save_original_format=uniform)
        if is_per_layer(model.config):  # served by moeshrink's vLLM plugin, refused by plain vLLM
            mark_per_layer_architecture(tmp / "config.json")
        write_extras(tmp, adapter, plan, source=source, tokenizer=tokenizer, model_card=model_card)
        for name, tensors in (sidecars or {}).items():
            save_extra(tmp / name, tensors)
        if before_commit is not None:
            before_commit(tmp)
    return Path(output)


def write_extras(
    directory: Path,
    adapter: FamilyAdapter,
    plan: ModelPlan,
    *,
    source: Path | None = None,
    tokenizer=None,
    model_card: str | None = None,
) -> None:
    """Everything of an export besides the weights and config.json: the config's expert-count
    aliases, the tokenizer, the plan (and its re-fitted tensors) and the model card."""
    write_config_aliases(directory, adapter, max(plan.num_experts_after), plan.top_k)
    copy_tokenizer(source, directory, tokenizer)
    plan.save(directory / PLAN_FILENAME)
    refit = plan.refit_state()
    if refit:
        save_extra(directory / REFIT_FILENAME, refit)
    if model_card is not None:
        (directory / "README.md").write_text(model_card)


def load_plan(path: str | Path) -> ModelPlan:
    """A saved plan, with its re-fitted tensors when the plan has any."""
    path = Path(path)
    plan = ModelPlan.load(path)
    if any(e.refit for lp in plan.layers for e in lp.experts):
        refit = find_extra(path.parent, REFIT_FILENAME, LEGACY_REFIT_FILENAME)
        if refit is None:
            raise MoeShrinkError(
                f"{path} re-fits merged experts but {path.parent / REFIT_FILENAME} is missing: keep the plan's "
                "folder together (the plan and its moeshrink_extras/ subfolder)"
            )
        plan.attach_refit(load_file(refit))
    return plan


def save_extra(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors that are not model weights (into the extras subfolder named in ``file``)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, file, metadata={"format": "pt"})
