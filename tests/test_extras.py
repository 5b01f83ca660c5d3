"""The core (``pip install moeshrink``) without the extras: lm-eval and matplotlib are imported only by the
commands that need them, and those commands name the extra to install in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeshrink.extras import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]

# The command line with the eval extra's modules absent (a None entry in sys.modules makes both `import`
# and importlib.util.find_spec treat a module as not installed).
WITHOUT_EVAL = (
    "import sys\n"
    "for name in ('lm_eval', 'matplotlib'):\n"
    "    sys.modules[name] = None\n"
    "from moeshrink.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_without_eval(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EVAL, *argv], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_the_core_dependencies_leave_out_the_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "lm-eval" not in core and "matplotlib" not in core
    extras = project["optional-dependencies"]
    assert {"eval", "vllm", "quantize", "all", "dev"} <= set(extras)
    assert any(r.startswith("lm-eval") for r in extras["eval"]) and any(
        r.startswith("matplotlib") for r in extras["eval"]
    )
    for module, (extra, distribution) in EXTRA_MODULES.items():
        assert any(r.startswith(distribution) for r in extras[extra]), module


def test_prune_and_inspect_run_without_the_eval_extra(checkpoints, calib_file, tmp_path):
    model = str(checkpoints["mixtral"])
    proc = run_without_eval("inspect", model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = ["prune", model, "--method", "reap", "--keep", "4", "--calib", str(calib_file)]
    proc = run_without_eval(*argv, "--samples", "4", "--seq-len", "32", "-o", "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{model}", "--tasks", "moeshrink_wiki"],
        ["demo", "--out", "demo", "--quiet"],
    ],
)
def test_commands_that_need_the_eval_extra_name_it(argv, checkpoints, tmp_path):
    argv = [a.format(model=checkpoints["mixtral"]) for a in argv]
    proc = run_without_eval(*argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert "pip install 'moeshrink[eval]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
