"""Cost benchmark: each one-shot method's wall time and peak memory as a ratio to the floor.

The floor is the least any calibration-based method must do: read the checkpoint once and run one
forward pass of the unpruned model over the same calibration tokens. It is measured in the same run,
streamed layer by layer like the methods (so it holds one layer at a time too). Every measurement
runs in its own process (peak RSS is that process's high-water mark, ``ru_maxrss``), one thread.
Checkpoints: the testbed (in memory and streamed) and synthetic Mixtral-shaped checkpoints of
growing size (``benchmarks/make_synthetic.py``; same layer shape, more layers), each deleted after
its runs. Results go to OUT.json (resumable: finished rows are kept) and OUT.md.

    OMP_NUM_THREADS=1 python benchmarks/cost.py --sizes 1 4 16 --big 26 --out docs/cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from moeshrink.testbed.paths import corpus_dir, testbed_model_dir

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- child process: one measurement


def _floor(job: dict) -> dict:
    """Read every tensor of the checkpoint once and run the calibration tokens through every layer."""
    import torch

    from moeshrink.engine.data import build_calibration
    from moeshrink.engine.runner import capture_layer_inputs, move_to_device, run_layer
    from moeshrink.io.checkpoint import load_model, load_tokenizer
    from moeshrink.io.streaming import StreamedLayers

    path = Path(job["model"])
    ids = build_calibration(load_tokenizer(path), [job["calib"]], job["samples"], job["seq_len"], 0).input_ids
    with torch.no_grad():
        if job["stream"]:
            streamer = StreamedLayers.open(path)
            model, layers = streamer.model, streamer.layers
        else:
            loaded = load_model(path)
            model, layers = loaded.model, loaded.adapter.decoder_layers(loaded.model)
            streamer = None
        adapter = streamer.adapter if streamer else loaded.adapter
        cached = capture_layer_inputs(model, adapter, ids, job["batch_size"], torch.device("cpu"))
        hidden = cached.hidden
        for index, layer in enumerate(layers):
            if streamer:
                streamer.load(index)
            kwargs = [move_to_device(kw, "cpu") for kw in cached.layer_kwargs[index]]
            hidden = run_layer(layer, hidden, kwargs)
            if streamer:
                streamer.release(index, write=False)
        normed = [model.model.norm(h) for h in hidden]
        [model.lm_head(h) for h in normed]
    return {}


def _prune(job: dict) -> dict:
    from moeshrink.pipeline import prune

    out = Path(job["scratch"]) / f"out-{os.getpid()}"
    try:
        result = prune(
            job["model"],
            job["method"],
            keep=job["keep"],
            calib=job["calib"],
            output=out,
            samples=job["samples"],
            seq_len=job["seq_len"],
            batch_size=job["batch_size"],
            stream=job["stream"],
            overwrite=True,
            progress=False,
            method_options=job.get("options") or None,
        )
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        return {"seconds_by_step": result.seconds, "output_bytes": written}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def peak_rss() -> int:
    """This process's own peak resident size: ``VmHWM`` (per address space, so it starts afresh at
    exec; ``ru_maxrss`` would carry over the parent's resident size at fork)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    from moeshrink.evaluate.speed import peak_rss_bytes

    return peak_rss_bytes()


def child(job: dict) -> None:
    import torch

    torch.set_num_threads(1)
    baseline = peak_rss()
    start = time.perf_counter()
    extra = _floor(job) if job["kind"] == "floor" else _prune(job)
    seconds = time.perf_counter() - start
    print(
        "RESULT " + json.dumps({"seconds": seconds, "peak_rss": peak_rss(), "baseline_rss": baseline} | extra)
    )


def measure(job: dict, timeout: float) -> dict:
    """Run one job in a fresh process and return what it reported (or the error)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


# ---------------------------------------------------------------- parent: the grid and the report


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _key(row: dict) -> str:
    return (
        f"{row['checkpoint']}|{row['kind']}|{row.get('method', '')}|{'stream' if row['stream'] else 'memory'}"
    )


def run_checkpoint(
    name: str,
    path: Path,
    methods: list[str],
    modes: list[bool],
    common: dict,
    keep: int,
    rows: dict,
    save,
    timeout: float,
    repeat: int = 1,
) -> None:
    import json as _json

    config = _json.loads((path / "config.json").read_text())
    info = {
        "checkpoint": name,
        "bytes": checkpoint_bytes(path),
        "layers": config["num_hidden_layers"],
        "dtype": config.get("dtype") or config.get("torch_dtype"),
    }
    for stream in modes:
        jobs = [dict(kind="floor")] + [dict(kind="prune", method=m) for m in methods]
        for job in jobs:
            method, _, opts = job.get("method", "").partition(":")
            row = (
                info | {"kind": job["kind"], "stream": stream} | ({"method": job["method"]} if method else {})
            )
            if _key(row) in rows and "error" not in rows[_key(row)]:
                continue
            spec = common | {"model": str(path), "stream": stream, "kind": job["kind"], "keep": keep}
            if method:
                spec |= {
                    "method": method,
                    "options": dict(o.split("=", 1) for o in filter(None, opts.split(","))),
                }
            print(
                f"[{time.strftime('%H:%M:%S')}] {name} {'stream' if stream else 'memory'} {job.get('method', 'floor')}",
                flush=True,
            )
            runs = [measure(spec, timeout) for _ in range(repeat if info["bytes"] < 1e9 else 1)]
            ok = [r for r in runs if "error" not in r]
            row |= min(ok, key=lambda r: r["seconds"]) | {"runs": len(runs)} if ok else runs[0]
            if ok:
                row["peak_rss"] = max(r["peak_rss"] for r in ok)
            print("   ", {k: row.get(k) for k in ("seconds", "peak_rss", "error")}, flush=True)
            rows[_key(row)] = row
            save()


def report(rows: dict, meta: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1) + "\n"
    )
    floors = {
        (r["checkpoint"], r["stream"]): r for r in rows.values() if r["kind"] == "floor" and "error" not in r
    }
    gib = 2**30
    lines = [
        "# Cost benchmark",
        "",
        "Wall time and peak resident memory of each one-shot method, as a ratio to the **floor**: one read of the",
        "checkpoint plus one forward pass of the unpruned model over the same calibration tokens, measured in the",
        "same run (its own process, like every row). `stream` rows read, prune and write one decoder layer at a",
        "time (`moeshrink prune --stream`); `memory` rows load the whole model. Method times include writing the",
        "output; the floor writes nothing. Produced by `benchmarks/cost.py`; raw numbers in `cost.json`.",
        "",
        f"Machine: {meta['machine']}. Calibration: {meta['samples']} sequences x {meta['seq_len']} tokens, batch "
        f"{meta['batch_size']}, one thread. Experts kept: half. Free disk at the start: {meta['free_disk_gb']:.0f} GB.",
        "",
        "| checkpoint | GB | layers | mode | method | seconds | time / floor | peak RSS GiB | RSS / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        rows.values(), key=lambda r: (r["bytes"], not r["stream"], r["kind"] != "floor", r.get("method", ""))
    )
    for r in order:
        floor = floors.get((r["checkpoint"], r["stream"]))
        mode = "stream" if r["stream"] else "memory"
        what = r.get("method", "**floor**")
        if "error" in r:
            lines.append(
                f"| {r['checkpoint']} | {r['bytes'] / 1e9:.2f} | {r['layers']} | {mode} | {what} | {r['error']} | | | |"
            )
            continue
        ratio_t = f"{r['seconds'] / floor['seconds']:.2f}" if floor else ""
        ratio_m = f"{r['peak_rss'] / floor['peak_rss']:.2f}" if floor else ""
        lines.append(
            f"| {r['checkpoint']} | {r['bytes'] / 1e9:.2f} | {r['layers']} | {mode} | {what} | {r['seconds']:.1f} | "
            f"{ratio_t} | {r['peak_rss'] / gib:.2f} | {ratio_m} |"
        )
    lines += ["", *_summary(rows, floors), "", *meta.get("notes", [])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _summary(rows: dict, floors: dict) -> list[str]:
    """Streamed runs against checkpoint size: time / floor and peak RSS per method."""
    streamed = [r for r in rows.values() if r["stream"] and "error" not in r]
    sizes = sorted({(r["bytes"], r["checkpoint"]) for r in streamed})
    methods = ["floor"] + sorted({r["method"] for r in streamed if r["kind"] == "prune"})
    cell = {(r["checkpoint"], r.get("method", "floor")): r for r in streamed}
    head = "| method | " + " | ".join(f"{b / 1e9:.2f} GB" for b, _ in sizes) + " |"
    rule = "|---|" + "---|" * len(sizes)
    lines = ["## Streamed: against checkpoint size", "", "Seconds (time / floor):", "", head, rule]
    for m in methods:
        values = []
        for _, name in sizes:
            r, floor = cell.get((name, m)), floors.get((name, True))
            secs = "" if r is None else f"{r['seconds']:.1f}" if r["seconds"] < 100 else f"{r['seconds']:.0f}"
            values.append(f"{secs} ({r['seconds'] / floor['seconds']:.2f})" if r and floor else "")
        lines.append(f"| {m} | " + " | ".join(values) + " |")
    lines += ["", "Peak RSS, GiB:", "", head, rule]
    for m in methods:
        values = [
            f"{cell[(name, m)]['peak_rss'] / 2**30:.2f}" if (name, m) in cell else "" for _, name in sizes
        ]
        lines.append(f"| {m} | " + " | ".join(values) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "cost")
    parser.add_argument("--methods", nargs="+", default=["frequency", "reap", "msmoe", "hcsmoe"])
    parser.add_argument("--synthetic-methods", nargs="+", default=["frequency", "reap", "msmoe"])
    parser.add_argument("--big-methods", nargs="+", default=["frequency"])
    parser.add_argument("--sizes", type=float, nargs="*", default=[1, 4, 16], help="synthetic sizes in GB")
    parser.add_argument(
        "--big", type=float, default=None, help="one more synthetic size (GB), larger than RAM"
    )
    parser.add_argument("--skip-testbed", action="store_true")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moeshrink-cost"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per job on checkpoints under 1 GB (fastest kept)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes under the table")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    previous = (
        json.loads(args.out.with_suffix(".json").read_text())
        if args.out.with_suffix(".json").is_file()
        else {}
    )
    rows = {_key(r): r for r in previous.get("rows", [])}
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    meta = previous.get("meta") or {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, {platform.system()}",
        "free_disk_gb": shutil.disk_usage(args.scratch).free / 1e9,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "ram_bytes": mem,
        "notes": [],
    }
    common = {
        "calib": str(corpus_dir() / "wiki" / "calib.jsonl"),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "scratch": str(args.scratch),
    }

    meta["notes"] = meta.get("notes", []) + args.note

    def save() -> None:
        report(rows, meta, args.out)

    if args.report_only:
        save()
        return

    if not args.skip_testbed:
        run_checkpoint(
            "testbed",
            testbed_model_dir(),
            args.methods,
            [False, True],
            common,
            8,
            rows,
            save,
            args.timeout,
            args.repeat,
        )
    sizes = [(s, args.synthetic_methods) for s in args.sizes] + (
        [(args.big, args.big_methods)] if args.big else []
    )
    for size, methods in sizes:
        name = f"synthetic-{size:g}GB"
        path = args.scratch / name
        done = all(
            _key({"checkpoint": name, "kind": k, "method": m, "stream": True}) in rows
            for k, m in [("floor", "")] + [("prune", m) for m in methods]
        )
        if done:
            continue
        free = shutil.disk_usage(args.scratch).free
        if not path.exists():
            print(f"[{time.strftime('%H:%M:%S')}] writing {name} ({free / 1e9:.0f} GB free)", flush=True)
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, str(HERE / "make_synthetic.py"), "--size-gb", str(size), "--out", str(path)],
                check=True,
                env=os.environ | {"OMP_NUM_THREADS": "1"},
            )
            meta.setdefault("generation_seconds", {})[name] = time.perf_counter() - t
        try:
            run_checkpoint(name, path, methods, [True], common, 4, rows, save, args.timeout)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
