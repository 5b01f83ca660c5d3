"""GPU check: prune the testbed on a GPU with three methods and compare with the same prune on the CPU.

For each method the testbed is pruned twice from the same calibration text, with ``--device cpu``
and with ``--device cuda``; the check compares the plans (the same experts kept or merged) and every
tensor of the two outputs (largest absolute difference, against a stated tolerance: the two devices
sum in different orders), and times the prune and the evaluation (perplexity on the test split and
speed) on each device. With vLLM importable (the official GPU build), the GPU output is also
verified in vLLM and its serving cost measured against the original (``moeshrink.verify``), as
``moeshrink verify OUT --original TESTBED --serving`` does.

Never a test dependency: run it whenever a GPU machine is available and commit what it writes
(``make setup`` keeps the machine's own CUDA torch; add ``pip install vllm`` for the vLLM part):

    make setup && .venv/bin/python benchmarks/gpu_check.py --out docs/gpu_check.json --report docs/gpu_check.md

``--device cpu`` runs the same script on the CPU twice (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import moeshrink
from moeshrink.evaluate.suite import evaluate_model
from moeshrink.io.checkpoint import load_model, weight_files
from moeshrink.io.export import load_plan
from moeshrink.testbed.paths import corpus_dir, testbed_model_dir

# Largest |difference| allowed between a CPU and a GPU output's tensors (bf16 weights: one rounding
# step of a value near 1 is 2**-8; merged experts are sums computed in float32 in another order).
TENSOR_TOLERANCE = 2**-6


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        out |= load_file(file)
    return out


def compare_outputs(cpu: Path, gpu: Path) -> dict:
    """Same experts per layer and every tensor within :data:`TENSOR_TOLERANCE`."""
    plan_cpu, plan_gpu = load_plan(cpu / "moeshrink_plan.json"), load_plan(gpu / "moeshrink_plan.json")
    same_experts = [
        [e.sources for e in a.experts] == [e.sources for e in b.experts]
        for a, b in zip(plan_cpu.layers, plan_gpu.layers, strict=True)
    ]
    a, b = tensors(cpu), tensors(gpu)
    if a.keys() != b.keys():
        return {"same_experts": all(same_experts), "same_tensor_names": False}
    worst_name, worst = "", 0.0
    for name in a:
        diff = (a[name].float() - b[name].float()).abs().max().item() if a[name].numel() else 0.0
        if diff > worst:
            worst_name, worst = name, diff
    return {
        "same_experts": all(same_experts),
        "layers_with_same_experts": sum(same_experts),
        "same_tensor_names": True,
        "max_abs_diff": worst,
        "max_abs_diff_tensor": worst_name,
        "within_tolerance": worst <= TENSOR_TOLERANCE,
    }


def timed_eval(directory: Path, device: str, max_tokens: int) -> tuple[dict, float]:
    loaded = load_model(directory, device=device)
    loaded.model.to(device)
    start = time.perf_counter()
    result = evaluate_model(loaded.model, loaded.tokenizer, max_tokens=max_tokens, device=device, usage=False)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=["reap", "msmoe", "stun"])
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument(
        "--eval-tokens", type=int, default=16384, help="test tokens per domain for perplexity"
    )
    parser.add_argument("--out", default="docs/gpu_check.json")
    parser.add_argument("--report", default="docs/gpu_check.md")
    parser.add_argument("--work", default=None, help="where the outputs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device here: this check needs a GPU machine (or --device cpu to smoke-test)"
        )
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    testbed = testbed_model_dir()
    calib = dict(calib=str(corpus_dir() / "wiki" / "calib.jsonl"), samples=64, seq_len=256, progress=False)
    rows = {}
    for method in args.methods:
        row: dict = {}
        for side, device in (("cpu", "cpu"), ("device", args.device)):
            out = work / f"{method}-{side}"
            start = time.perf_counter()
            moeshrink.prune(
                testbed, method, keep=args.keep, output=out, device=device, overwrite=True, **calib
            )
            row[f"prune_seconds_{side}"] = time.perf_counter() - start
            evaluation, seconds = timed_eval(out, device, args.eval_tokens)
            row[f"eval_seconds_{side}"] = seconds
            row[f"perplexity_{side}"] = {d: v.get("perplexity") for d, v in evaluation["domains"].items()}
            row[f"path_{side}"] = str(out)
        row["comparison"] = compare_outputs(Path(row["path_cpu"]), Path(row["path_device"]))
        rows[method] = row
        print(method, json.dumps(row["comparison"]), flush=True)
    vllm_result = None
    try:
        import vllm  # noqa: F401
    except ImportError:
        vllm_result = {"status": "skipped: vLLM not importable"}
    if vllm_result is None:
        from moeshrink.verify import verify_checkpoint
        from moeshrink.verify.serving import ServingSettings, random_prompts, serving_cost

        output = Path(rows[args.methods[0]]["path_device"])
        verification = verify_checkpoint(output, load_model(output).model)
        settings = ServingSettings()
        vocab = int(json.loads((testbed / "config.json").read_text())["vocab_size"])
        serving = serving_cost(
            {"original": testbed, f"{args.methods[0]} 16->{args.keep}": output},
            random_prompts(vocab, settings),
            settings,
        )
        vllm_result = {"verification": verification.to_dict(), "serving": serving}
    meta = {
        "command": shlex.join(
            ["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "tolerance": TENSOR_TOLERANCE,
        "load_1min_end": os.getloadavg()[0],
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "vllm": vllm_result}, indent=1) + "\n")
    Path(args.report).write_text(render(meta, rows, vllm_result, args.device))
    print(f"wrote {args.out} and {args.report}")
    failed = [m for m, r in rows.items() if not r["comparison"].get("within_tolerance")]
    return 1 if failed else 0


def render(meta: dict, rows: dict, vllm_result: dict, device: str) -> str:
    lines = [
        "# GPU check",
        "",
        f"`{meta['command']}` on {meta['device']} ({meta['machine']}, torch {meta['torch']}): the testbed "
        f"pruned on the CPU and on `{device}` from the same calibration text; tensors compared with "
        f"tolerance {meta['tolerance']:g}.",
        "",
        f"| method | same experts | max abs. tensor difference | prune s (cpu / {device}) | eval s (cpu / {device}) |",
        "|---|---|---|---|---|",
    ]
    for method, r in rows.items():
        c = r["comparison"]
        lines.append(
            f"| {method} | {c['same_experts']} | {c.get('max_abs_diff', float('nan')):.2e} "
            f"| {r['prune_seconds_cpu']:.1f} / {r['prune_seconds_device']:.1f} "
            f"| {r['eval_seconds_cpu']:.1f} / {r['eval_seconds_device']:.1f} |"
        )
    lines += ["", "vLLM: " + json.dumps(vllm_result, indent=None)[:2000], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
