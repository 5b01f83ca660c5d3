"""Serving cost where users serve: weight memory and vLLM offline throughput of the testbed and of
moeshrink outputs, all measured in one run, as ratios to the original.

Outputs: REAP 16 -> 8, M-SMoE 16 -> 8, REAP 16 -> 4, M-SMoE 16 -> 4, top-1 (every expert kept),
REAP with a global budget (8 per layer on average, served through moeshrink's vLLM plugin), and a
per-layer top-k from an EEP search at a mean of 1.5 active experts (plugin too). Every model is
served by vLLM in its checkpoint dtype, each in a fresh process (``moeshrink.verify.serving``, the
measurement ``moeshrink verify --serving`` records in a model card), one after the other, on the same fixed
prompts (held-out corpus text): prefill tokens/s (``max_tokens=1``) and generation tokens/s
(``--new-tokens`` per prompt, end-of-text ignored), best of ``--repeat``.

Needs vLLM (run it with the venv ``make test-vllm`` makes):

    .venv-vllm/bin/python benchmarks/serve.py --out docs/serve.json --report docs/serve.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("MOESHRINK_VERIFY", "0")  # outputs are verified by tests/vllm; this measures

import moeshrink  # noqa: E402
from moeshrink.search import search  # noqa: E402
from moeshrink.testbed.paths import DOMAINS, corpus_dir, tasks_dir, testbed_model_dir  # noqa: E402
from moeshrink.verify.serving import ServingSettings, serving_cost  # noqa: E402


def make_outputs(root: Path) -> dict[str, Path]:
    """The original and each output (made once; reused when already there)."""
    testbed = testbed_model_dir()
    calib = dict(calib=str(corpus_dir() / "wiki" / "calib.jsonl"), samples=64, seq_len=256, progress=False)
    runs = {
        "REAP 16->8": dict(method="reap", keep=8),
        "M-SMoE 16->8": dict(method="msmoe", keep=8),
        "REAP 16->4": dict(method="reap", keep=4),
        "M-SMoE 16->4": dict(method="msmoe", keep=4),
        "top-1 (16 experts)": dict(method="none", top_k=1),
        "REAP global budget (8 on average)": dict(method="reap", keep=8, global_budget=True),
    }
    outputs = {"original (16 experts, top-2)": testbed}
    for name, kwargs in runs.items():
        out = root / name.split(" (")[0].replace(" ", "-").replace(">", "")
        if not (out / "config.json").is_file():
            moeshrink.prune(testbed, output=out, **calib, **kwargs)
        outputs[name] = out
    searched = root / "EEP-active-1.5"
    if not (searched / "config.json").is_file():
        search(
            testbed,
            tasks_dir() / "moeshrink_bible.jsonl",
            keep=8,
            active_experts=1.5,
            objective="text",
            init=["frequency", "reap"],
            items=64,
            prune_iterations=4,
            merge_iterations=0,
            output=searched,
            progress=False,
        )
    outputs["EEP 16->8, per-layer top-k (1.5 on average)"] = searched
    return outputs


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of held-out text, alternating the four domains."""
    windows = []
    for domain in DOMAINS:
        text = " ".join(
            json.loads(line)["text"]
            for line in (corpus_dir() / domain / "test.jsonl").read_text().splitlines()[:50]
        )
        ids = tokenizer(text)["input_ids"]
        windows.append([ids[i : i + length] for i in range(0, len(ids) - length, length)])
    mixed = [w for group in zip(*windows, strict=False) for w in group]
    if len(mixed) < count:
        raise SystemExit(f"only {len(mixed)} prompt windows of {length} tokens; lower --prompts")
    return mixed[:count]


def render(rows: dict[str, dict], meta: dict) -> str:
    base = next(iter(rows.values()))
    lines = [
        "# Serving cost in vLLM",
        "",
        f"Measured by `{meta['command']}` on {meta['machine']} ({meta['note']}), vLLM {meta['vllm']},",
        f"each model in its checkpoint dtype ({meta['dtype']}), {meta['prompts']} prompts of {meta['prompt_tokens']} "
        f"tokens, {meta['new_tokens']} new tokens each, best of {meta['repeat']}; every row from the same run.",
        "",
        "| model | weight bytes | prefill tokens/s | generation tokens/s |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['weight_bytes'] / 2**20:.1f} MiB ({row['weight_bytes'] / base['weight_bytes']:.2f}x) "
            f"| {row['prefill_tokens_per_s']:,.0f} ({row['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x) "
            f"| {row['generation_tokens_per_s']:,.0f} "
            f"({row['generation_tokens_per_s'] / base['generation_tokens_per_s']:.2f}x) |"
        )
    lines += [
        "",
        "Ratios are to the original in the first row. The global-budget and per-layer top-k rows are "
        "served through moeshrink's vLLM plugin.",
    ]
    twins = ("REAP 16->8", "M-SMoE 16->8")
    if all(t in rows for t in twins):
        a, b = (rows[t] for t in twins)
        spread = max(abs(a[k] / b[k] - 1) for k in ("prefill_tokens_per_s", "generation_tokens_per_s"))
        lines += [
            "",
            f"{twins[0]} and {twins[1]} have tensors of identical shapes, so the same cost: they differ by up "
            f"to {spread:.0%} here, which is this run's noise. On a 30 MB model a CPU step of 16 short prompts is "
            "mostly fixed per-step overhead, not expert arithmetic: only the weight bytes and the top-1 row "
            "stand clearly above the noise, and the speed of a real MoE needs a real one (or a GPU) to measure.",
        ]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/serve", help="where the outputs are made (reused)")
    parser.add_argument("--out", default="docs/serve.json")
    parser.add_argument("--report", default="docs/serve.md")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--note", default="nothing else running", help="the machine's load, for the report")
    parser.add_argument("--render-only", action="store_true", help="re-write --report from --out")
    args = parser.parse_args(argv)
    if args.render_only:
        saved = json.loads(Path(args.out).read_text())
        Path(args.report).write_text(render(saved["rows"], saved["meta"]))
        return 0
    from transformers import AutoConfig, AutoTokenizer

    outputs = make_outputs(Path(args.work))
    tokenizer = AutoTokenizer.from_pretrained(testbed_model_dir())
    input_ids = prompts(tokenizer, args.prompts, args.prompt_tokens)
    settings = ServingSettings(args.prompts, args.prompt_tokens, args.new_tokens, args.repeat)
    serving = serving_cost(outputs, input_ids, settings)
    rows = {name: {"path": str(outputs[name])} | row for name, row in serving["rows"].items()}
    engine = serving["engine"]
    meta = {
        "command": shlex.join(["python", "benchmarks/serve.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{serving['machine']}, {engine['device']}",
        "note": args.note,
        "vllm": engine["version"],
        "dtype": str(AutoConfig.from_pretrained(testbed_model_dir()).dtype),
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    Path(args.report).write_text(render(rows, meta))
    print(f"wrote {args.out} and {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
