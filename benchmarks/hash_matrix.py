"""A fixed matrix of moeshrink runs and the sha256 of every file each one writes.

Run it before and after a change that should not change behaviour and compare the two JSON files:
every output file should be byte-identical. The runs go through the ``moeshrink`` command (in this
process), so they pin what users see, whatever the code behind the command looks like.

The matrix: every expert-level method x {in memory, ``--stream``} x {uniform, ``--global-budget``}
on the shipped testbed (mixtral, 16 -> 8) and a tiny random qwen3_moe (8 -> 4); sparsity variants
(wanda 50 %, 2:4, owl, magnitude over every scope, ``--total-sparsity`` with STUN, wanda streamed);
a recipe with steps; ``apply`` of a saved merge plan; and one EEP search with a fixed seed. A run
the command refuses is recorded by its error message.

The inputs (testbed, calibration file, recipe) are copied into ``--work`` first, so the paths
written into plans and model cards are the same wherever the code runs from: use the same ``--work``
for the runs you compare. Volatile fields of ``moeshrink_plan.json`` (versions, seconds) are dropped
before hashing; every other file is hashed as written.

    python benchmarks/hash_matrix.py --out runs/hashes-before.json --work /tmp/hash-matrix
    python benchmarks/hash_matrix.py --out runs/hashes-after.json --work /tmp/hash-matrix \
        --compare runs/hashes-before.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from moeshrink.cli import main as moeshrink
from moeshrink.testbed.paths import corpus_dir, tasks_dir, testbed_model_dir
from moeshrink.testbed.tiny import build_tiny_model

METHODS = (
    "random",
    "frequency",
    "soft_activation",
    "ean",
    "reap",
    "naee",
    "msmoe",
    "hcsmoe",
    "uncurl",
    "stun",
)
VOLATILE = {"versions", "seconds", "search_seconds"}
CALIB = ["--calib", "{calib}", "--samples", "16", "--seq-len", "128"]

RECIPE = """\
calib: [{calib}]
samples: 16
seq_len: 128
steps:
  - experts: {{method: reap, keep: 8}}
  - top_k: 1
  - sparsify: {{sparsity: 0.3, method: wanda}}
"""


def _normalised(value):
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (the plan with its volatile fields dropped)."""
    out = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if file.name == "moeshrink_plan.json":
            data = json.dumps(_normalised(json.loads(data)), sort_keys=True).encode()
        out[str(file.relative_to(directory))] = hashlib.sha256(data).hexdigest()
    return out


def cases(work: Path) -> dict[str, list[str]]:
    """Name -> ``moeshrink`` arguments (``{calib}``, ``{recipe}``, ``{plan}`` and ``{task}`` are filled in later)."""
    testbed = str(work / "inputs" / "testbed")
    tiny = work / "qwen3_moe"
    if not tiny.is_dir():
        build_tiny_model("qwen3_moe", tiny, seed=1)
    runs: dict[str, list[str]] = {}
    for family, model, keep in (("mixtral", testbed, "8"), ("qwen3_moe", str(tiny), "4")):
        for method in METHODS:
            for memory in ("memory", "stream"):
                for budget in ("uniform", "global"):
                    args = ["prune", model, "--method", method, "--keep", keep, *CALIB]
                    args += ["--stream"] if memory == "stream" else ["--no-stream"]
                    args += ["--global-budget"] if budget == "global" else []
                    runs[f"{family}/{method}/{memory}/{budget}"] = args
    base = ["prune", testbed, "--keep", "8", *CALIB]
    stun = ["prune", testbed, "--method", "stun", "--ratio", "0.25", "--total-sparsity", "0.55", *CALIB]
    runs |= {
        "sparsity/reap+wanda50": [*base, "--method", "reap", "--sparsity", "0.5"],
        "sparsity/reap+wanda50/stream": [*base, "--method", "reap", "--sparsity", "0.5", "--stream"],
        "sparsity/reap+2:4": [*base, "--method", "reap", "--nm", "2:4"],
        "sparsity/reap+owl50": [*base, "--method", "reap", "--sparsity", "0.5", "--sparsity-method", "owl"],
        "sparsity/none+magnitude30/all": [
            "prune",
            testbed,
            "--method",
            "none",
            "--sparsity",
            "0.3",
            "--sparsity-method",
            "magnitude",
            "--sparsity-scope",
            "all",
        ],
        "sparsity/stun+total55": stun,
        "sparsity/stun+total55/global": [*stun, "--global-budget"],
        "topk/none+top1": ["prune", testbed, "--method", "none", "--top-k", "1"],
        "recipe/steps": ["prune", testbed, "--recipe", "{recipe}"],
        "apply/msmoe-plan": ["apply", testbed, "--plan", "{plan}"],
        "search/eep": [
            "search",
            testbed,
            "--task",
            "{task}",
            "--keep",
            "8",
            "--items",
            "16",
            "--population",
            "4",
            "--prune-iterations",
            "2",
            "--merge-iterations",
            "2",
            "--seed",
            "3",
        ],
    }
    return runs


def run_case(args: list[str], out: Path) -> dict:
    """Run ``moeshrink args -o out``; the files' digests, or the error it printed."""
    if out.exists():
        shutil.rmtree(out)
    stderr = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = moeshrink(
            [*args, "-o", str(out), "--quiet"] if args[0] != "apply" else [*args, "-o", str(out)]
        )
    seconds = round(time.perf_counter() - start, 2)
    if code != 0:
        lines = [line for line in stderr.getvalue().splitlines() if line.startswith("moeshrink: error")]
        return {"error": lines[-1] if lines else f"exit {code}", "seconds": seconds}
    return {"files": digest(out), "seconds": seconds}


def compare(before: dict, after: dict) -> list[str]:
    """One line per case whose outputs differ."""
    lines = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            lines.append(f"{name}: only in {'after' if a is None else 'before'}")
            continue
        if a.get("error") != b.get("error"):
            lines.append(f"{name}: error {a.get('error')!r} -> {b.get('error')!r}")
        fa, fb = a.get("files", {}), b.get("files", {})
        for file in sorted(set(fa) | set(fb)):
            if fa.get(file) != fb.get(file):
                lines.append(f"{name}: {file} differs")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the digests")
    parser.add_argument("--work", default="runs/hash-matrix", help="scratch directory")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--compare", help="an earlier --out file: list every case whose files differ")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (keep equal across runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Outputs are compared without the fresh-process verification (it only adds its own record).
    os.environ.setdefault("MOESHRINK_VERIFY", "0")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs"
    if not inputs.is_dir():
        shutil.copytree(testbed_model_dir(), inputs / "testbed")
        shutil.copy(corpus_dir() / "wiki" / "calib.jsonl", inputs / "calib.jsonl")
        shutil.copy(tasks_dir() / "moeshrink_bible.jsonl", inputs / "bible.jsonl")
    calib = inputs / "calib.jsonl"
    recipe = inputs / "recipe.yaml"
    recipe.write_text(RECIPE.format(calib=calib))
    plan_source = work / "plan-source"
    if not (plan_source / "moeshrink_plan.json").is_file():
        source = ["prune", str(inputs / "testbed"), "--method", "msmoe", "--keep", "8", *CALIB]
        run_case([a.format(calib=calib) for a in source], plan_source)
    results = {}
    for name, case in cases(work).items():
        if args.only and args.only not in name:
            continue
        fill = {"calib": calib, "recipe": recipe, "plan": plan_source / "moeshrink_plan.json"}
        case = [a.format(task=inputs / "bible.jsonl", **fill) for a in case]
        results[name] = run_case(case, work / "out")
        outcome = results[name].get("error") or f"{len(results[name]['files'])} files"
        print(f"{name}: {outcome} ({results[name]['seconds']} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        differences = compare(json.loads(Path(args.compare).read_text()), results)
        print("\n".join(differences) if differences else "every output file is byte-identical")
        return 1 if differences else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
