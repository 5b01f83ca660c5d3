"""Prune, then quantize on the testbed (issue #15, item 6): perplexity ratios to the unpruned model of
prune-only, quantize-only and prune-then-quantize, per scheme.

The testbed (16 experts, bfloat16) is pruned 16 -> ``--keep`` with ``--method`` on general calibration
text (every domain's calib split mixed, ``--samples`` x ``--seq-len`` tokens); quantize-only is method
``none`` with the same quantize step on the same tokens; prune-then-quantize is one ``moeshrink.prune``
with ``quantize=SCHEME``. Each output is written, reloaded with ``moeshrink.io.checkpoint.load_model``
(compressed-tensors dequantized to bfloat16: the weights' quantization error exactly, the run-time
activation quantization of FP8_DYNAMIC / W8A8 not simulated) and evaluated on every domain's held-out
``--split`` (test: the reported numbers). No default is chosen from these numbers. Runs in the
``.venv-quant`` environment (``make setup-quant``). Results go to OUT.json and OUT.md.

    nice -n 10 env OMP_NUM_THREADS=1 .venv-quant/bin/python benchmarks/prune_then_quantize.py --out docs/prune_then_quantize
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import moeshrink
from moeshrink.evaluate.suite import evaluate_model
from moeshrink.io.checkpoint import load_model
from moeshrink.io.streaming import ShardReader
from moeshrink.quant.oneshot import library_versions
from moeshrink.testbed.paths import DOMAINS, corpus_dir, testbed_model_dir


def _evaluate(path: Path, args: argparse.Namespace) -> dict:
    loaded = load_model(path)
    row = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        split=args.split,
        max_tokens=args.eval_tokens,
        usage=False,
        speed=False,
    )
    row["weight_bytes"] = ShardReader(path).total_bytes
    return row


def main() -> None:
    """Measure every row not yet in OUT.json, then write OUT.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/prune_then_quantize"))
    parser.add_argument("--method", default="reap")
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--schemes", nargs="+", default=["FP8_DYNAMIC", "W4A16"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    json_path = args.out.with_suffix(".json")
    if args.render_only:
        args.out.with_suffix(".md").write_text(render(json.loads(json_path.read_text())))
        return
    data = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    if data.get("settings", {}).get("split", args.split) != args.split:
        sys.exit(f"{json_path} holds rows measured on another split: use another --out")
    model_dir = testbed_model_dir()
    calib = [corpus_dir() / d / "calib.jsonl" for d in DOMAINS]
    data["settings"] = {k: v for k, v in vars(args).items() if k != "render_only"} | {"out": str(args.out)}
    data["environment"] = library_versions() | {
        "moeshrink": moeshrink.__version__,
        "python": platform.python_version(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    command = "python benchmarks/prune_then_quantize.py " + " ".join(sys.argv[1:])
    if command not in data.setdefault("commands", []):
        data["commands"].append(command)
    if "baseline" not in data:
        data["baseline"] = _evaluate(model_dir, args)
    variants = [("prune", args.method, None)]
    for scheme in args.schemes:
        variants += [("quantize", "none", scheme), ("prune+quantize", args.method, scheme)]
    for kind, method, scheme in variants:
        key = f"{kind}|{method}|{args.keep if method != 'none' else 16}|{scheme or '-'}"
        if key in data["rows"]:
            continue
        print(f"[prune_then_quantize] {key}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            start = time.perf_counter()
            result = moeshrink.prune(
                str(model_dir),
                method,
                keep=None if method == "none" else args.keep,
                calib=calib,
                samples=args.samples,
                seq_len=args.seq_len,
                output=out,
                quantize=scheme,
                verify=False,
                progress=False,
            )
            seconds = time.perf_counter() - start
            row = _evaluate(out, args)
            row["seconds"] = round(seconds, 1)
            if result.plan.quantization:
                row["quantization"] = result.plan.quantization
        data["rows"][key] = row
        json_path.write_text(json.dumps(data, indent=1) + "\n")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(data))
    print(f"wrote {json_path} and {args.out.with_suffix('.md')}")


def render(data: dict) -> str:
    """The markdown report of OUT.json."""
    s = data["settings"]
    base = data["baseline"]
    domains = list(base["domains"])
    lines = [
        f"# Prune, then quantize: perplexity ratio to the unpruned testbed ({s['split']} split)",
        "",
        "Commands (in `.venv-quant`, `make setup-quant`):",
        "",
        *[f"    nice -n 10 env OMP_NUM_THREADS=1 .venv-quant/bin/{c}" for c in data["commands"]],
        "",
        f"Testbed `moeshrink-tiny` (16 experts, bfloat16); {s['method']} 16 -> {s['keep']} experts; calibration "
        f"{s['samples']} x {s['seq_len']} tokens of every domain's calib split mixed, the same tokens for the "
        f"quantize step; perplexity on up to {s['eval_tokens']} held-out tokens per domain. Environment: "
        + ", ".join(f"{k} {v}" for k, v in data.get("environment", {}).items())
        + ". Unpruned perplexity: "
        + ", ".join(f"{d} {base['domains'][d]['perplexity']:.2f}" for d in domains)
        + f"; weight files {base['weight_bytes']:,} bytes.",
        "",
        "| variant | scheme | experts | " + " | ".join(domains) + " | geo. mean | weight bytes |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|",
    ]
    for key, row in data["rows"].items():
        kind, method, keep, scheme = key.split("|")
        ratios = [row["domains"][d]["perplexity"] / base["domains"][d]["perplexity"] for d in domains]
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        size = f"{row['weight_bytes']:,} ({row['weight_bytes'] / base['weight_bytes']:.1%})"
        lines.append(
            f"| {kind} ({method}) | {scheme} | {keep} | "
            + " | ".join(f"{r:.3f}" for r in ratios)
            + f" | **{geo:.3f}** | {size} |"
        )
    lines += [
        "",
        "Ratios are perplexity over the unpruned model's on the same text (1.000: no loss). Quantized outputs "
        "are evaluated with their weights dequantized (`moeshrink.io.checkpoint.load_model`), so the table "
        "measures the weights' quantization error; FP8_DYNAMIC's run-time activation quantization is not "
        "simulated on this CPU. Weight bytes: the safetensors tensors (the embedding, tied with the LM head "
        "and left unquantized, is 4 MiB of them).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
