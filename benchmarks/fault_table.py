"""The fault-injection case table (docs/faults.md): run every case of tests/test_faults.py (the slow
SIGKILL variants too) and write what each did: exit code, message, input intact, output state and
whether that is what the case asks for.

    .venv/bin/python benchmarks/fault_table.py                      # this tree -> docs/faults.md
    .venv/bin/python benchmarks/fault_table.py --before 5e2bf4d     # and the same cases on REV's src/

``--before REV`` runs the same test file against ``src/`` as it was at REV (git archive into a
temporary folder, put first on PYTHONPATH): the column shows what each case did before the fixes.
Cases whose hook point REV lacks say so. Needs root for the disk-full cases (a small tmpfs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTRO = """\
# Fault injection: the case table

What a careless or adversarial user can do to a run (issue #14), each case through the real command
line on a copy of a tiny checkpoint: bad configs, bad shards, bad budgets, bad calibration text, bad
recipes, hand-edited plans, dangerous output paths, Ctrl-C (a real SIGINT) and SIGKILL at chosen
moments, a disk that fills up, concurrent writers. Every case checks the exit code, the one error
line (never a traceback, nothing printed after it), the input's hashes, and the output: absent,
complete and loadable, or left as it was, with no hidden temporary, old copy or lock beside it.

- Tests: `tests/test_faults.py` (default run: every case but the slow SIGKILL variants, under a
  minute on a quiet machine; `-m slow` for those). The output-path matrix (13 paths x prune,
  `--stream` and apply, and search) is in `tests/test_output_safety.py`; the messages of the Python
  API are checked in `tests/test_bad_input.py`.
- Disk full: the output (or `--offload-hidden`) on a 16 MiB tmpfs, mounted by the test (root only;
  skipped otherwise, saying why). "Fills up during the write" lets the free-disk pre-check pass and
  then fills the disk to half the estimated output, as another program writing would.
- Free-disk pre-check: the estimate counts every tensor of the output (routed experts scaled to those
  kept: an upper bound for merges) at the dtype it is saved in, the re-fitted down projections of
  merges with `reconstruct`, and the tokenizer and config files copied; it asks for that plus 5%
  (at least 4 MiB) for the plan, the model card, safetensors headers and file-system blocks. It used
  to add a fixed 64 MiB, which refused a 10 MiB output on a disk with 60 MiB free.
- SIGKILL leaves no chance to clean up: the case checks that the input is unchanged and the output
  absent, complete or as it was, and that the next run (`--overwrite`) succeeds and removes what the
  killed one left (its temporaries carry its process id).
- Explained, not defects: a missing or mis-shaped tensor prints transformers' own load report
  (several lines, no traceback) before moeshrink's one line, which is the last; `--top-k 0` is
  refused by the job's validation, worded "steps.1.top_k: Input should be greater than or equal to
  1"; an output whose parent is not writable cannot be tested as root (root may write anywhere).
- The "before" column ran this test file against `src/` at the named commit; a case whose hook point
  (a function that commit lacks) cannot be set up there says so.

Made by `{command}`{when}.
"""
COLUMNS = ["category", "case", "family", "exit", "message", "input intact", "output", "verdict"]


def run_cases(table: Path, src: Path | None) -> int:
    """Run every case with the table written to ``table`` (``src``: the package source to test)."""
    env = {**os.environ, "MOESHRINK_FAULTS_TABLE": str(table)}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_faults.py",
        "-q",
        "-m",
        "",
        "-p",
        "no:cacheprovider",
    ]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def read_table(path: Path) -> list[dict[str, str]]:
    """The rows of a table written by the test file."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")][2:]
    rows = []
    for line in lines:
        cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
        rows.append(dict(zip(COLUMNS, cells, strict=False)))
    return rows


def before_cell(row: dict[str, str] | None) -> str:
    """What a case did on the older version, in one cell."""
    if row is None:
        return "not run"
    if row["verdict"] == "ok":
        return "ok"
    if row["verdict"].startswith("not set up"):  # the hook point of the case is not in that version
        return "not reproducible there: " + row["verdict"].removeprefix("not set up: ")[:80]
    message = row["message"] if len(row["message"]) <= 70 else row["message"][:69] + "…"
    return f"exit {row['exit']}; {message or 'no message'}; input {row['input intact']}; {row['output']}"


def markdown(
    rows: list[dict[str, str]], before: dict[tuple[str, str], dict[str, str]] | None, rev: str
) -> str:
    """The case table, with the older version's outcome when there is one."""
    columns = COLUMNS + ([f"before ({rev})"] if before is not None else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in COLUMNS]
        if before is not None:
            cells.append(before_cell(before.get((row["category"], row["case"]))))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, str]], before: dict | None, rev: str) -> str:
    """How many cases, how many do what they ask, by category."""
    by_category: dict[str, list[int]] = {}
    for row in rows:
        counts = by_category.setdefault(row["category"], [0, 0, 0])
        counts[0] += 1
        counts[1] += row["verdict"] == "ok"
        if before is not None:
            old = before.get((row["category"], row["case"]))
            counts[2] += old is not None and old["verdict"] == "ok"
    total = [sum(c[i] for c in by_category.values()) for i in range(3)]
    head = f"{total[0]} cases; {total[1]} do what they ask"
    if before is not None:
        head += f"; before ({rev}): {total[2]}"
    parts = ", ".join(
        f"{name} {c[1]}/{c[0]}" + (f" (before {c[2]})" if before is not None else "")
        for name, c in by_category.items()
    )
    return f"{head}. By category: {parts}.\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REV", help="also run the cases on src/ at this git revision")
    parser.add_argument("--out", default=str(ROOT / "docs" / "faults.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        code = run_cases(Path(tmp) / "after.md", None)
        rows = read_table(Path(tmp) / "after.md")
        before = None
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.before, "src"], cwd=ROOT, capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            run_cases(Path(tmp) / "before.md", old / "src")
            before = {(r["category"], r["case"]): r for r in read_table(Path(tmp) / "before.md")}
    command = "python benchmarks/fault_table.py" + (f" --before {args.before}" if args.before else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    when = (
        f" on commit {commit.stdout.strip()} (with the working tree's changes, if any)"
        if commit.stdout
        else ""
    )
    text = INTRO.format(command=command, when=when) + "\n" + summary(rows, before, args.before or "")
    text += "\n" + markdown(rows, before, args.before or "")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}: {summary(rows, before, args.before or '').strip()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
