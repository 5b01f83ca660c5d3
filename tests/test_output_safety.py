"""The input checkpoint is never modified: an output that is the input, contains it or lies inside it
is refused through the real CLI before any work, with or without --overwrite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moeshrink.cli import main
from moeshrink.errors import MoeShrinkError
from moeshrink.io.export import atomic_directory, check_output_dir
from moeshrink.plan import PLAN_FILENAME
from moeshrink.testbed.tiny import build_tiny_model

from .conftest import tree_digest

IS_INPUT = "is the input checkpoint"
CONTAINS_INPUT = "contains the input checkpoint"
INSIDE_INPUT = "is inside the input checkpoint"

PRUNE = ["prune", "--method", "random", "--keep", "4", "--quiet"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny Mixtral checkpoint, copied by every test (never written to)."""
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("pristine") / "model", seed=1)


@pytest.fixture(scope="module")
def plan_file(pristine: Path, tmp_path_factory) -> Path:
    """A plan made from the pristine checkpoint by a prune into a safe output (also a positive control)."""
    out = tmp_path_factory.mktemp("plan") / "pruned"
    assert main([*PRUNE, str(pristine), "-o", str(out)]) == 0
    return out / PLAN_FILENAME


@pytest.fixture
def model(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint at tmp_path/root/parent/model, with parent/link -> model."""
    path = tmp_path / "root" / "parent" / "model"
    shutil.copytree(pristine, path)
    (path.parent / "link").symlink_to(path, target_is_directory=True)
    return path


def _listing(directory: Path) -> set[str]:
    """Every file, folder and link under ``directory`` (hidden ones included)."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# Each case: (input, output) from the checkpoint path (the test may chdir first), and the refusal.
Case = Callable[[Path, pytest.MonkeyPatch], tuple[str, str]]


def _relative_same(m: Path, mp: pytest.MonkeyPatch) -> tuple[str, str]:
    mp.chdir(m.parent)
    return "model", "../parent/./model"


def _relative_parent(m: Path, mp: pytest.MonkeyPatch) -> tuple[str, str]:
    mp.chdir(m)
    return ".", ".."


def _relative_inside(m: Path, mp: pytest.MonkeyPatch) -> tuple[str, str]:
    mp.chdir(m.parent)
    return "model", "model/sub"


CASES: dict[str, tuple[Case, str]] = {
    "same": (lambda m, mp: (str(m), str(m)), IS_INPUT),
    "same-input-via-symlink": (lambda m, mp: (str(m.parent / "link"), str(m)), IS_INPUT),
    "same-output-via-symlink": (lambda m, mp: (str(m), str(m.parent / "link")), IS_INPUT),
    "same-relative": (_relative_same, IS_INPUT),
    "same-dotdot": (lambda m, mp: (str(m), str(m / "sub" / "..")), IS_INPUT),
    "parent": (lambda m, mp: (str(m), str(m.parent)), CONTAINS_INPUT),
    "parent-relative": (_relative_parent, CONTAINS_INPUT),
    "parent-input-via-symlink": (lambda m, mp: (str(m.parent / "link"), str(m.parent)), CONTAINS_INPUT),
    "grandparent": (lambda m, mp: (str(m), str(m.parent.parent)), CONTAINS_INPUT),
    "inside": (lambda m, mp: (str(m), str(m / "sub")), INSIDE_INPUT),
    "inside-deep": (lambda m, mp: (str(m), str(m / "a" / "b")), INSIDE_INPUT),
    "inside-relative": (_relative_inside, INSIDE_INPUT),
    "inside-via-symlink": (lambda m, mp: (str(m), str(m.parent / "link" / "sub")), INSIDE_INPUT),
}

COMMANDS: dict[str, Callable[[str, str, Path], list[str]]] = {
    "prune": lambda src, out, plan: [*PRUNE, src, "-o", out, "--overwrite"],
    "prune-stream": lambda src, out, plan: [*PRUNE, "--stream", src, "-o", out, "--overwrite"],
    "apply": lambda src, out, plan: ["apply", src, "--plan", str(plan), "-o", out, "--overwrite"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_over_the_input_is_refused(
    command: str, case: str, model: Path, plan_file: Path, tmp_path: Path, monkeypatch, capsys
):
    make, message = CASES[case]
    digest, listing = tree_digest(model), _listing(tmp_path)
    src, out = make(model, monkeypatch)
    assert main(COMMANDS[command](src, out, plan_file)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeshrink: error: output directory") and "\n" not in err
    assert message in err and "choose" in err and str(model.resolve()) in err
    assert tree_digest(model) == digest
    assert _listing(tmp_path) == listing  # no output, no hidden .tmp- folder anywhere


@pytest.mark.parametrize("output", ["same", "parent"])
def test_search_refuses_the_input_as_output(output: str, model: Path, tmp_path: Path, capsys):
    digest, listing = tree_digest(model), _listing(tmp_path)
    out = model if output == "same" else model.parent
    argv = ["search", str(model), "--task", "nonexistent-task", "--keep", "4", "-o", str(out), "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (IS_INPUT if output == "same" else CONTAINS_INPUT) in err
    assert tree_digest(model) == digest and _listing(tmp_path) == listing


def test_without_overwrite_the_input_is_refused_as_input(model: Path, capsys):
    """Not 'already exists ... pass --overwrite', which would invite the data loss."""
    digest = tree_digest(model)
    assert main([*PRUNE, str(model), "-o", str(model)]) == 2
    err = capsys.readouterr().err
    assert IS_INPUT in err and "--overwrite" not in err
    assert tree_digest(model) == digest


@pytest.mark.parametrize("stream", [False, True])
def test_a_sibling_sharing_the_name_prefix_is_allowed(stream: bool, model: Path):
    """``model-small`` beside ``model`` is neither the input nor inside it (a path, not a string, test)."""
    digest = tree_digest(model)
    out = model.parent / "model-small"
    assert main([*PRUNE, *(["--stream"] if stream else []), str(model), "-o", str(out)]) == 0
    assert (out / PLAN_FILENAME).is_file() and tree_digest(model) == digest


def test_check_output_dir_and_atomic_directory(model: Path, tmp_path: Path):
    with pytest.raises(MoeShrinkError, match=IS_INPUT):
        check_output_dir(model, True, source=model.parent / "link")
    before = _listing(tmp_path)
    with pytest.raises(MoeShrinkError, match=CONTAINS_INPUT):
        with atomic_directory(model.parent, overwrite=True, source=model):
            pytest.fail("atomic_directory yielded a directory over the input")
    assert _listing(tmp_path) == before
    # A source that does not exist has nothing to lose; without one nothing is compared.
    assert check_output_dir(tmp_path / "out", True, source=tmp_path / "out" / "missing") == tmp_path / "out"
    assert check_output_dir(model / "sub", True) == model / "sub"


def _tiny_prune(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--method", "random", "--keep", "4", "-o", str(out), "--quiet", *extra]


def test_a_second_writer_of_the_same_output_fails_clearly(tmp_path, capsys):
    from moeshrink.io.export import PendingOutput

    model = build_tiny_model("mixtral", tmp_path / "m", seed=1)
    busy = PendingOutput(tmp_path / "out")  # another run writing it
    try:
        assert main(_tiny_prune(model, tmp_path / "out", "--overwrite")) == 2
        assert "another moeshrink run is writing" in capsys.readouterr().err
        assert main(_tiny_prune(model, tmp_path / "out", "--overwrite", "--stream")) == 2
    finally:
        busy.discard()
    assert main(_tiny_prune(model, tmp_path / "out")) == 0  # free again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # no lock or temporary left


def test_temporaries_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    model = build_tiny_model("mixtral", tmp_path / "m", seed=1)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".out.tmp-{dead_pid}-0badc0de", tmp_path / f".out.old-{dead_pid}-0badc0de"]
    for path in stale:
        (path / "sub").mkdir(parents=True)
    alive = tmp_path / f".out.tmp-{os.getpid()}-live0000"  # a run still writing (this process)
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid}-0badc0de"  # another output's
    other.mkdir()
    assert main(_tiny_prune(model, tmp_path / "out")) == 0
    assert not any(p.exists() for p in stale)
    assert alive.is_dir() and other.is_dir()


def test_replacing_an_output_leaves_no_old_copy(tmp_path):
    model = build_tiny_model("mixtral", tmp_path / "m", seed=1)
    assert main(_tiny_prune(model, tmp_path / "out")) == 0
    (tmp_path / "out" / "marker").write_text("old")
    assert main(_tiny_prune(model, tmp_path / "out", "--overwrite", "--seed", "3")) == 0
    assert not (tmp_path / "out" / "marker").exists() and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


# Twelve child processes: slow. The default run kills children at chosen moments in test_faults.py.
@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("stream", [False, True])
def test_killed_run_leaves_input_intact_and_no_half_output(delay, stream, tmp_path):
    """SIGKILL at several moments of a run (start-up, calibration, export): the input is unchanged, the
    output is absent or complete and loadable, and the next run succeeds and clears the leftovers."""
    from moeshrink.io.checkpoint import load_model
    from moeshrink.testbed.paths import corpus_dir

    model = build_tiny_model("qwen3_moe", tmp_path / "m", seed=1)
    before = tree_digest(model)
    out = tmp_path / "out"
    args = [
        *_tiny_prune(model, out),
        "--method",
        "reap",
        "--calib",
        str(corpus_dir() / "wiki" / "calib.jsonl"),
    ]
    args += ["--samples", "16", "--seq-len", "64"] + (["--stream"] if stream else [])
    env = {**os.environ, "MOESHRINK_VERIFY": "0"}
    run = subprocess.Popen([sys.executable, "-m", "moeshrink.cli", *args], env=env, stderr=subprocess.DEVNULL)
    try:
        run.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()
    assert tree_digest(model) == before
    if out.exists():
        load_model(out)  # complete
    assert (
        subprocess.run([sys.executable, "-m", "moeshrink.cli", *args, "--overwrite"], env=env).returncode == 0
    )
    load_model(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # stale temporaries cleared
