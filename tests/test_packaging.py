"""`python -m build` makes a wheel and an sdist with the testbed inside; the wheel, installed into a fresh
venv, runs `moeshrink inspect` and `moeshrink prune` on the testbed it ships.

Offline and fast: the wheel is built from the sdist without build isolation and installed with
``--no-deps`` into a venv that sees this environment's packages (a ``.pth`` line; the editable source
tree is not on its path). ``make check-package`` (CI) installs it with its declared dependencies instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = "moeshrink/testbed/data"

pytestmark = pytest.mark.slow


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"{argv}: {proc.stderr[-3000:]}"
    return proc.stdout


def shipped_data_files() -> set[str]:
    """The testbed files under version control, as paths inside the package."""
    out = run("git", "ls-files", f"src/{DATA}", cwd=ROOT)
    return {line.removeprefix("src/") for line in out.splitlines()}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # no flags: the sdist first, then the wheel built from the sdist (so the sdist is checked too)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    return out


def test_wheel_and_sdist_hold_the_testbed(dist):
    (wheel,) = dist.glob("moeshrink-*.whl")
    (sdist,) = dist.glob("moeshrink-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = shipped_data_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)[:5]}"
    assert "moeshrink/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    top = members[0].split("/")[0]
    assert not shipped_data_files() - {n.removeprefix(f"{top}/src/") for n in members}
    assert {f"{top}/LICENSE", f"{top}/CHANGELOG.md", f"{top}/tests/conftest.py"} <= set(members)


def test_the_wheel_in_a_fresh_venv_inspects_and_prunes_its_testbed(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # this environment's packages (torch, transformers, ...) after the venv's own; a plain path line, so
    # the editable install's own .pth (the source tree) is not processed
    (site / "deps-from-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = dist.glob("moeshrink-*.whl")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel)

    where = run(python, "-c", "from moeshrink.testbed import paths; print(paths.DATA)")
    data = Path(where.strip())
    assert data.is_relative_to(site), f"moeshrink imported from {data}, not the installed wheel"
    moeshrink = env_dir / "bin" / "moeshrink"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    info = json.loads(
        subprocess.run(
            [moeshrink, "inspect", data / "moeshrink-tiny", "--json"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            cwd=tmp_path,
        ).stdout
    )
    assert info["family"] == "mixtral" and info["experts_per_layer"] == [16] * 4
    calib = data / "corpus" / "wiki" / "calib.jsonl"
    argv = ["prune", data / "moeshrink-tiny", "--method", "reap", "--keep", "8", "--calib", calib]
    run(moeshrink, *argv, "--samples", "4", "--seq-len", "64", "-o", tmp_path / "pruned", "--quiet")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_local_experts"] == 8
