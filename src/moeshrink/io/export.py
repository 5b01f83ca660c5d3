"""Write a compressed model as a standard Hugging Face checkpoint, atomically.

Everything is written into a hidden temporary directory beside the output and renamed into place
when complete, so a crash never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeshrink.arch import FamilyAdapter
from moeshrink.errors import MoeShrinkError, is_out_of_space
from moeshrink.io.checkpoint import TOKENIZER_FILES, find_extra
from moeshrink.plan import LEGACY_REFIT_FILENAME, PLAN_FILENAME, REFIT_FILENAME, ModelPlan
from moeshrink.serving import write_architectures


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


@contextmanager
def out_of_space_is_an_error(output: str | Path) -> Iterator[None]:
    """Turn the disk filling up while ``output`` is written into a one-line :class:`MoeShrinkError`
    (the caller removes what was written)."""
    try:
        yield
    except MoeShrinkError:
        raise
    except Exception as e:
        if not is_out_of_space(e):
            raise
        parent = Path(output).absolute().parent
        raise MoeShrinkError(
            f"the disk filled up while writing {output}: the partial output was removed and nothing was "
            f"written; free some space on {parent} or choose another --output"
        ) from e


def check_output_dir(output: str | Path, overwrite: bool, *, source: str | Path | None = None) -> Path:
    """Refuse an output that is, contains or lies inside the input checkpoint ``source`` (even with
    ``overwrite``), and an existing output unless ``overwrite``; make sure its parent can be written."""
    if source is not None:
        check_not_source(output, source)
    output = Path(output)
    check_not_being_written(output)
    if output.exists() and not overwrite:
        raise MoeShrinkError(f"output directory {output} already exists: choose another or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise MoeShrinkError(f"output {output} exists and is not a directory: choose another path")
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise MoeShrinkError(f"cannot write into {parent}: choose a writable output directory")
    return output


def _lock_path(output: Path) -> Path:
    return output.absolute().parent / f".{output.name}.lock"


def _busy(output: Path) -> MoeShrinkError:
    return MoeShrinkError(
        f"another moeshrink run is writing {output} right now: wait for it to finish, or choose another "
        "output directory"
    )


def check_not_being_written(output: Path) -> None:
    """Refuse, before any work, an output another run is writing now (it holds the output's lock).
    :class:`PendingOutput` takes the lock itself when the writing starts."""
    try:
        lock = os.open(_lock_path(output), os.O_RDWR)
    except OSError:  # no lock file: nobody writes it (a parent that does not exist yet, too)
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _busy(output) from None
    finally:
        os.close(lock)


class PendingOutput:
    """An output directory being written: a hidden temporary directory beside it (same file system),
    renamed into place by :meth:`commit`, removed by :meth:`discard` or when dropped uncommitted.

    While it exists it holds a lock on the output path (``.NAME.lock`` beside it, ``flock``), so a
    second run writing the same output fails at once with a clear message instead of racing. Its name
    carries this process's id, so a later run can tell a temporary directory left by a killed run
    (its process is gone) from one still being written, and remove only the former."""

    def __init__(self, output: Path):
        self.output = Path(output)
        parent = self.output.absolute().parent
        self._lock_file = _lock_path(self.output)
        self._lock = os.open(self._lock_file, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise _busy(self.output) from None
        remove_stale_temporaries(self.output)
        self.directory = parent / f".{self.output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.directory.mkdir()
        self._finalizer = weakref.finalize(self, _discard, self.directory, self._lock_file, self._lock)

    def commit(self) -> Path:
        """Put the finished directory in place of the output (atomically where the system allows)."""
        replace_directory(self.directory, self.output)
        self._finalizer()  # releases the lock; the temporary directory is gone already
        return self.output

    def discard(self) -> None:
        """Remove the temporary directory and release the lock."""
        self._finalizer()


def _discard(directory: Path, lock_file: Path, lock: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    lock_file.unlink(missing_ok=True)
    os.close(lock)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Remove the temporary and replaced directories of ``output`` left by runs that were killed (their
    process id is in the name and that process no longer exists); returns what was removed."""
    removed = []
    for path in Path(output).absolute().parent.glob(f".{Path(output).name}.*-*"):
        kind, _, rest = path.name.removeprefix(f".{Path(output).name}.").partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and path.is_dir() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


_RENAME_EXCHANGE = 2
_LIBC = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system cannot."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.renameat2.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    at_cwd = -100
    return _LIBC.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_directory(tmp: Path, output: Path) -> None:
    """Put the finished ``tmp`` in place of ``output``. An existing output is swapped out in one atomic
    step where the system allows it, so a crash never leaves neither; else it is first renamed aside
    under a name a later run recognises and cleans up."""
    if output.exists() and _exchange(tmp, output):
        shutil.rmtree(tmp, ignore_errors=True)  # it now holds the old output
        return
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    pending = PendingOutput(check_output_dir(output, overwrite, source=source))
    try:
        with out_of_space_is_an_error(output):
            yield pending.directory
    except BaseException:
        pending.discard()
        raise
    pending.commit()


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
    source_architectures = list(model.config.architectures or [])  # save_pretrained overwrites them
    with atomic_directory(output, overwrite, source=source) as tmp:
        model.save_pretrained(tmp, save_original_format=uniform)
        write_architectures(tmp / "config.json", source_architectures)
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
