"""Cost benchmark: each method's wall time and peak memory as a ratio to a floor from the same run.

The **floor** is the least any calibration-based method must do: tokenize the calibration text, read
the checkpoint once and run the calibration tokens once through every decoder layer of the unpruned
model, layer by layer as the methods do (streamed like them under ``--stream``; no logits: no method
computes them). Every measurement is its own process with
one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``); peak RSS is that process's
``VmHWM``. Floors are interleaved with the methods they divide: floor, method, floor, method, ...,
floor, so each method run has a floor run just before and just after it, and a row's ratio divides
its fastest method run by the fastest of those adjacent floors. With ``--repeat N`` the whole sequence
is run N times round-robin (best of N), except for methods whose first run took longer than
``--repeat-below`` seconds (best of 1). Each run records the 1-minute load average when it starts and
ends, so a row measured while the machine was busy can be seen as such.

One invocation is one run: a run id, the machine, the versions and every single measurement go to
OUT.json, which a rerun replaces whole (it never resumes or mixes rows of two runs; ``--report-only``
refuses a file that does). Calibration files are copied (and hashed) at the start, so every row of a
run sees the same text. Checkpoints: the testbed (``--modes memory stream``) and, streamed, synthetic
Mixtral-shaped checkpoints of growing size (``--sizes``, ``benchmarks/make_synthetic.py``; block-FP8
with ``--synthetic-fp8-block R C``), each deleted after its rows. ``--memory-limit-gib X`` runs every
measurement in a memory cgroup of X GiB (page cache included; needs a writable /sys/fs/cgroup), so a
checkpoint larger than the memory a run may use can be tested on a machine whose disk cannot hold one
larger than its RAM.

    python benchmarks/cost.py --calib-domains wiki pydoc --keep 8 4 --repeat 3 --out docs/cost
    python benchmarks/cost.py --skip-testbed --sizes 10 --synthetic-fp8-block 128 128 --memory-limit-gib 4 \
        --out docs/cost_fp8_stream
    python benchmarks/cost.py --model src/moeshrink/testbed/data/moeshrink-tiny-ds3 --keep 32 16 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FLOOR = "floor"
PRUNING = ["random", "frequency", "soft_activation", "ean", "reap", "naee", "stun"]
MERGING = ["msmoe", "hcsmoe", "uncurl"]


# ---------------------------------------------------------------- child process: one measurement


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


def _floor(job: dict) -> Callable[[], dict]:
    """The floor, imports done: tokenize, read every tensor once, run the tokens through every layer."""
    import torch

    from moeshrink.engine.data import build_calibration
    from moeshrink.engine.runner import capture_layer_inputs, move_to_device, run_layer
    from moeshrink.io.checkpoint import load_config, load_model, load_tokenizer
    from moeshrink.io.streaming import ShardReader, StreamedLayers
    from moeshrink.quant import read_quantization
    from moeshrink.quant.source import QuantizedLayers, open_quantized

    def run() -> dict:
        path, steps = Path(job["model"]), {}
        t = time.perf_counter()
        tokenizer = load_tokenizer(path)
        ids = build_calibration(tokenizer, [job["calib"]], job["samples"], job["seq_len"], 0).input_ids
        steps["prepare"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            scheme = read_quantization(path)
            if (
                job["stream"] and scheme is not None
            ):  # as the methods read it: one layer dequantized at a time
                config, adapter = load_config(path)
                reader = ShardReader(path)
                quantized = open_quantized(path, scheme, reader)
                streamer = QuantizedLayers(path, config, adapter, reader, quantized, "auto", resident=False)
                model, layers = streamer.model, streamer.layers
            elif job["stream"]:
                streamer = StreamedLayers.open(path)
                model, layers, adapter = streamer.model, streamer.layers, streamer.adapter
            else:
                loaded, streamer = load_model(path), None
                model, adapter = loaded.model, loaded.adapter
                layers = adapter.decoder_layers(model)
            steps["load"] = time.perf_counter() - t
            t, cpu = time.perf_counter(), time.process_time()
            cached = capture_layer_inputs(model, adapter, ids, job["batch_size"], torch.device("cpu"))
            hidden = cached.hidden
            for index, layer in enumerate(layers):
                if streamer:
                    streamer.load(index)
                kwargs = [move_to_device(kw, "cpu") for kw in cached.layer_kwargs[index]]
                hidden = run_layer(layer, hidden, kwargs)
                if streamer:
                    streamer.release(index, write=False)
            steps["forward"] = time.perf_counter() - t
        return {"steps": steps, "cpu_steps": {"forward": time.process_time() - cpu}}

    return run


def _prune(job: dict) -> Callable[[], dict]:
    """One ``moeshrink prune`` as a user runs it (output written, verified if asked), imports done. The
    CPU seconds of its layer loop (statistics, method, re-run of the changed layers: nearly all of its
    ``compress`` step) are taken around ``run_steps``."""
    import moeshrink.job
    from moeshrink.pipeline import prune

    cpu_steps: dict[str, float] = {}
    run_steps = moeshrink.job.run_steps

    def timed_run_steps(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return run_steps(*args, **kwargs)
        finally:
            cpu_steps["compress"] = cpu_steps.get("compress", 0.0) + time.process_time() - start

    moeshrink.job.run_steps = timed_run_steps

    options = dict(job.get("options") or {})
    # recovery is a step of its own, not a method option: method:recover=true[,recover_ridge=R]
    step_fields = {k: json.loads(options.pop(k)) for k in ("recover", "recover_ridge") if k in options}

    def run() -> dict:
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
                method_options=options or None,
                verify=job.get("verify", False),
                **step_fields,
            )
            written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            steps = {k: v for k, v in result.seconds.items() if k != "total"}
            return {"steps": steps, "cpu_steps": cpu_steps, "output_bytes": written}
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the verification processes)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def child(job: dict) -> None:
    """Run one measurement and print its result as one ``RESULT {json}`` line."""
    import torch

    torch.set_num_threads(1)
    baseline = peak_rss()
    run = _floor(job) if job["kind"] == FLOOR else _prune(job)
    load_start, cpu, start = os.getloadavg(), _cpu_seconds(), time.perf_counter()
    extra = run()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_start": list(load_start),
        "load_end": list(os.getloadavg()),
        "peak_rss": peak_rss(),
        "baseline_rss": baseline,
    }
    print("RESULT " + json.dumps(result | extra), flush=True)


def memory_cgroup(name: str, limit_gib: float) -> Path:
    """A memory cgroup ``name`` limiting its processes to ``limit_gib`` GiB (page cache counts; cgroup v2
    ``memory.max`` or v1 ``memory.limit_in_bytes``, swap off where v1 allows); an error when this
    machine does not let us make one."""
    limit = str(int(limit_gib * 2**30))
    v2 = Path("/sys/fs/cgroup")
    candidates = [(v2 / name, "memory.max", None)] if (v2 / "cgroup.controllers").is_file() else []
    v1 = v2 / "memory"
    candidates += [(v1 / name, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes")] if v1.is_dir() else []
    for path, limit_file, swap_file in candidates:
        try:
            path.mkdir(exist_ok=True)
            (path / limit_file).write_text(limit)
            if swap_file and (path / swap_file).exists():
                (path / swap_file).write_text(limit)
            return path
        except OSError:
            continue
    sys.exit(
        f"--memory-limit-gib: cannot make a memory cgroup under {v2} (needs root and cgroups); drop the option"
    )


def measure(
    job: dict, timeout: float, source: Path | None = None, script: str = __file__, cgroup: Path | None = None
) -> dict:
    """Run one job in a fresh process (``script --child``, importing moeshrink from ``source`` when given,
    inside the memory ``cgroup`` when given) and return what it reported (or the error)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))

    def join_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    try:
        proc = subprocess.run(
            [sys.executable, script, "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            preexec_fn=join_cgroup if cgroup is not None else None,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode in (-9, 137) and cgroup is not None:
        return {"error": "killed: out of memory in the memory cgroup"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information")]  # pydantic's link
    return {"error": (lines or ["no output"])[-1][:300]}


# ---------------------------------------------------------------- bookkeeping (pure, tested)


def job_label(job: dict) -> str:
    """The row a method run belongs to within its group, e.g. ``reap|8``, ``reap+verify|8`` or, for the
    code of another commit (``--before``), ``naee@35c434b|8``."""
    before = f"@{job['before']}" if job.get("before") else ""
    return f"{job['method']}{'+verify' if job.get('verify') else ''}{before}|{job['keep']}"


def run_group(
    group: dict,
    jobs: list[dict],
    repeat: int,
    repeat_below: float,
    measure_one: Callable[[dict], dict],
    record: Callable[[dict], None],
) -> None:
    """Measure ``jobs`` of one group interleaved with floors: F, J1, F, J2, ..., F, then again round-robin
    for ``repeat`` passes; a job whose first run took longer than ``repeat_below`` seconds is not repeated.
    ``measure_one`` gets a spec (``group | job | {"kind": ...}``); ``record`` gets each sample with its
    place in the sequence (``seq``)."""
    seq = 0

    def take(spec: dict) -> dict:
        nonlocal seq
        sample = {"seq": seq, "started": time.strftime("%Y-%m-%dT%H:%M:%S")} | spec | measure_one(spec)
        seq += 1
        record(sample)
        return sample

    first: dict[str, dict] = {}
    take(group | {"kind": FLOOR})
    for rep in range(repeat):
        for job in jobs:
            label = job_label(job)
            done = first.get(label)
            if rep and (done is None or "error" in done or done["seconds"] > repeat_below):
                continue
            sample = take(group | job | {"kind": "prune"})
            first.setdefault(label, sample)
            take(group | {"kind": FLOOR})


def single_run(samples: Iterable[dict]) -> str:
    """The one run id of ``samples``; a ValueError if they come from several runs (or none)."""
    ids = {s["run_id"] for s in samples}
    if len(ids) != 1:
        raise ValueError(f"cost rows must come from one run, found run ids {sorted(ids)}")
    return ids.pop()


def group_key(sample: dict) -> str:
    """Samples that share floors: one checkpoint, mode and calibration domain."""
    return f"{sample['checkpoint']}|{'stream' if sample['stream'] else 'memory'}|{sample['domain']}"


def _adjacent_floors(ordered: list[dict], index: int) -> list[dict]:
    """The nearest successful floor before and after ``ordered[index]`` in its group's sequence."""
    found = []
    for step in (-1, 1):
        i = index + step
        while 0 <= i < len(ordered):
            if ordered[i]["kind"] == FLOOR and "error" not in ordered[i]:
                found.append(ordered[i])
                break
            i += step
    return found


def _load_range(samples: list[dict]) -> list[float]:
    loads = [s[k][0] for s in samples for k in ("load_start", "load_end")]
    return [min(loads), max(loads)]


def summarize(samples: list[dict]) -> list[dict]:
    """One row per (group, method, keep), each divided only by the floors run next to its own runs, plus
    one floor row per group. Refuses samples of several runs."""
    if not samples:
        return []
    run_id = single_run(samples)
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(group_key(s), []).append(s)
    rows = []
    for key, members in groups.items():
        ordered = sorted(members, key=lambda s: s["seq"])
        info = {k: ordered[0][k] for k in ("checkpoint", "bytes", "layers", "stream", "domain")}
        floors = [s for s in ordered if s["kind"] == FLOOR and "error" not in s]
        if floors:
            rows.append(
                info
                | {
                    "run_id": run_id,
                    "group": key,
                    "kind": FLOOR,
                    "runs": len(floors),
                    "seconds": min(s["seconds"] for s in floors),
                    "seconds_median": statistics.median(s["seconds"] for s in floors),
                    "seconds_max": max(s["seconds"] for s in floors),
                    "forward_seconds": min(s["steps"]["forward"] for s in floors),
                    "cpu_seconds": min(s["cpu_seconds"] for s in floors),
                    "forward_cpu_seconds": min(s["cpu_steps"]["forward"] for s in floors),
                    "peak_rss": max(s["peak_rss"] for s in floors),
                    "load_1min": _load_range(floors),
                }
            )
        labels = list(dict.fromkeys(job_label(s) for s in ordered if s["kind"] != FLOOR))
        for label in labels:
            index = [i for i, s in enumerate(ordered) if s["kind"] != FLOOR and job_label(s) == label]
            runs = [ordered[i] for i in index]
            ok = [s for s in runs if "error" not in s]
            row = info | {"run_id": run_id, "group": key, "kind": "prune", "method": runs[0]["method"]}
            row["verify"] = bool(runs[0].get("verify"))
            if runs[0].get("before"):
                row["before"] = runs[0]["before"]
            row |= {"keep": runs[0]["keep"], "runs": len(runs)}
            if not ok:
                rows.append(row | {"error": runs[0]["error"]})
                continue
            adjacent = {
                f["seq"]: f for i in index if "error" not in ordered[i] for f in _adjacent_floors(ordered, i)
            }
            near = list(adjacent.values())
            best = min(ok, key=lambda s: s["seconds"])
            row |= {
                "seconds": best["seconds"],
                "seconds_max": max(s["seconds"] for s in ok),
                "steps": best["steps"],
                "compress_seconds": min(s["steps"]["compress"] for s in ok),
                "cpu_seconds": min(s["cpu_seconds"] for s in ok),
                "compress_cpu_seconds": min(s["cpu_steps"]["compress"] for s in ok),
                "peak_rss": max(s["peak_rss"] for s in ok),
                "output_bytes": best.get("output_bytes"),
                "floor_seqs": sorted(adjacent),
                "load_1min": _load_range(ok + near),
            }
            if near:
                floor = {
                    "seconds": min(f["seconds"] for f in near),
                    "forward": min(f["steps"]["forward"] for f in near),
                    "cpu": min(f["cpu_seconds"] for f in near),
                    "forward_cpu": min(f["cpu_steps"]["forward"] for f in near),
                    "rss": max(f["peak_rss"] for f in near),
                }
                row |= {
                    "floor_seconds": floor["seconds"],
                    "floor_forward_seconds": floor["forward"],
                    "floor_cpu_seconds": floor["cpu"],
                    "floor_forward_cpu_seconds": floor["forward_cpu"],
                    "time_over_floor": row["seconds"] / floor["seconds"],
                    "cpu_over_floor": row["cpu_seconds"] / floor["cpu"],
                    "compress_over_forward": row["compress_seconds"] / floor["forward"],
                    "compress_cpu_over_forward_cpu": row["compress_cpu_seconds"] / floor["forward_cpu"],
                    "rss_over_floor": row["peak_rss"] / floor["rss"],
                }
            rows.append(row)
    return rows


# ---------------------------------------------------------------- the report


def _s(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


def _load(row: dict) -> str:
    low, high = row["load_1min"]
    return f"{low:.1f}–{high:.1f}"


def _table_row(r: dict, width: int) -> str:
    """One markdown row of the per-group table (see ``render`` for the columns)."""
    gib = 2**30
    if r["kind"] == FLOOR:
        cells = [
            "",
            "**floor**",
            str(r["runs"]),
            _s(r["cpu_seconds"]),
            "",
            "",
            "",
            _s(r["forward_cpu_seconds"]),
        ]
        cells += ["", f"{_s(r['seconds'])} (median {_s(r['seconds_median'])}, max {_s(r['seconds_max'])})"]
        cells += ["", "", "", f"{r['peak_rss'] / gib:.2f}", "", _load(r)]
    elif "error" in r:
        cells = [str(r["keep"]), r["method"], str(r["runs"]), r["error"]] + [""] * (width - 4)
    else:
        what = f"{r['method']}, output verified" if r.get("verify") else r["method"]
        what += f", at commit {r['before']}" if r.get("before") else ""
        ratio = "floor_seconds" in r

        def of(key: str, fmt: Callable[[float], str] = lambda v: f"{v:.2f}") -> str:
            return fmt(r[key]) if ratio else ""

        cells = [str(r["keep"]), what, str(r["runs"]), _s(r["cpu_seconds"]), of("floor_cpu_seconds", _s)]
        cells += [
            f"**{of('cpu_over_floor')}**",
            _s(r["compress_cpu_seconds"]),
            of("floor_forward_cpu_seconds", _s),
        ]
        cells += [f"**{of('compress_cpu_over_forward_cpu')}**", _s(r["seconds"]), of("floor_seconds", _s)]
        cells += [of("time_over_floor"), of("compress_over_forward"), f"{r['peak_rss'] / gib:.2f}"]
        cells += [of("rss_over_floor"), _load(r)]
    return "| " + " | ".join(cells) + " |"


def _results_name(command: str) -> str:
    """The JSON file a run's command wrote (``--out docs/cost_stun`` -> ``cost_stun.json``)."""
    words = command.split()
    out = words[words.index("--out") + 1] if "--out" in words[:-1] else "docs/cost"
    return Path(out).with_suffix(".json").name


def render(data: dict) -> str:
    """OUT.md from OUT.json: one table per group, the floor first."""
    meta, samples = data["meta"], data["samples"]
    single_run(samples)
    rows = summarize(samples)
    machine, versions = meta["machine"], meta["versions"]
    lines = [
        "# Cost benchmark",
        "",
        "Time and peak resident memory of each method, as a ratio to the **floor**: tokenizing the calibration",
        "text, one read of the checkpoint and one pass of the calibration tokens through every decoder layer of",
        "the unpruned model, layer by layer as the methods run them. The floors are measured in the same run,",
        "interleaved with the methods (floor, method, floor, method, ..., floor): each ratio divides a method's",
        "fastest run by the fastest of the floors run just before and just after its own runs. Every",
        "measurement is its own process with one thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`).",
        "",
        "- **CPU / floor**: CPU seconds of the whole `moeshrink prune --output` against the floor's. CPU time",
        "  is what the work costs; wall time on a shared machine also counts the time spent waiting for a core.",
        "- **compress / forward, CPU**: the part that differs between methods (the layer loop: the forward",
        "  pass collecting statistics, the method, the re-run of each changed layer) against the floor's",
        "  forward pass alone, CPU seconds. Both runs read the same tokens.",
        "- wall columns: the same in elapsed seconds, as measured; `load` shows how busy the machine was.",
        "",
        "A method also writes its output (the floor writes nothing). Outputs are not verified (as with",
        "`MOESHRINK_VERIFY=0`) except in the rows marked *output verified*: verification, on by default, loads",
        "the output in a fresh process and compares it with the model in memory, a cost that does not depend",
        "on the method. Produced by `benchmarks/cost.py`; every single measurement is in "
        f"`{_results_name(meta.get('command', ''))}`.",
        "",
        f"Run `{meta['run_id']}`, {meta['started']} to {meta.get('finished', '(unfinished)')}:",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['ram_gib']:.0f} GiB RAM, {machine['system']}; AVX-512: {'yes' if machine['avx512'] else 'no'}. "
        f"Python {versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}, "
        f"moeshrink {versions['moeshrink']} (commit {versions['commit'][:10]}, {meta.get('source', 'working tree')}). "
        f"1-minute load average {meta['load_start'][0]:.1f} at the start, "
        f"{meta.get('load_end', [float('nan')])[0]:.1f} at the end.",
        "",
        *(
            [
                f"Every measurement ran in a memory cgroup limited to {meta['memory_limit_gib']:g} GiB "
                "(resident memory and page cache together, no swap): it could not hold a checkpoint larger "
                "than that, however much RAM the machine has.",
                "",
            ]
            if meta.get("memory_limit_gib")
            else []
        ),
        *(
            [
                f"Rows *at commit {meta['before']}* run that commit's `src/` (the code before the change), each "
                "right after the same method at the run's commit, between the same floors.",
                "",
            ]
            if meta.get("before")
            else []
        ),
        f"Calibration: {meta['samples']} sequences x {meta['seq_len']} tokens of one domain's calib split, "
        f"batch {meta['batch_size']}, one thread; best of {meta['repeat']} for methods whose first run took "
        f"at most {meta['repeat_below']:g} s, best of 1 above. `load` is the range of the 1-minute load "
        "average at the start and end of the row's runs and of its floors (above the number of cores, other "
        "work was waiting for a core).",
        "",
    ]
    columns = [
        "keep",
        "method",
        "runs",
        "CPU s",
        "floor CPU s",
        "**CPU / floor**",
        "compress CPU s",
        "forward CPU s",
        "**compress / forward, CPU**",
        "wall s",
        "floor wall s",
        "wall / floor",
        "compress / forward, wall",
        "peak RSS GiB",
        "RSS / floor",
        "load",
    ]
    for key in dict.fromkeys(r["group"] for r in rows):
        group = [r for r in rows if r["group"] == key]
        first = group[0]
        mode = "streamed" if first["stream"] else "in memory"
        lines += [
            f"## {first['checkpoint']} ({first['bytes'] / 1e9:.2f} GB, {first['layers']} layers), {mode}, "
            f"calibrated on {first['domain']}",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        lines += [_table_row(r, len(columns)) for r in group]
        lines.append("")
    lines += meta.get("notes", [])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the run


def _cpu_model() -> tuple[str, bool]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return model or platform.processor() or platform.machine(), "avx512f" in flags


def machine_info() -> dict:
    """The CPU model, cores and RAM of this machine."""
    cpu, avx512 = _cpu_model()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "avx512": avx512,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram / 2**30,
        "system": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict:
    """Python, torch, transformers and moeshrink versions and the git commit of this tree."""
    import torch
    import transformers

    from moeshrink import __version__

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moeshrink": __version__,
        "commit": git("rev-parse", "HEAD") or "unknown",
        "working_tree_src_modified": bool(git("status", "--porcelain", "--", "src")),
    }


def _checkpoint_info(name: str, path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {
        "checkpoint": name,
        "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
        "layers": config["num_hidden_layers"],
    }


def snapshot_source(scratch: Path, commit: str = "HEAD") -> Path:
    """``src/`` of ``commit`` (default: the committed HEAD), unpacked under ``scratch``: every process of a run
    imports the same code, whatever is edited in the working tree meanwhile."""
    archive = subprocess.run(
        ["git", "archive", commit, "src/moeshrink"], cwd=HERE.parent, capture_output=True, check=True
    )
    scratch.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)
    return scratch / "src"


def _freeze_calibration(domains: list[str], corpus: Path, scratch: Path) -> dict[str, dict]:
    """Copy each domain's calib split into the scratch directory (other work may rewrite the corpus)."""
    frozen = {}
    for domain in domains:
        source = corpus / domain / "calib.jsonl"
        copy = scratch / f"calib-{domain}.jsonl"
        shutil.copyfile(source, copy)
        frozen[domain] = {"path": str(copy), "sha256": hashlib.sha256(copy.read_bytes()).hexdigest()}
    return frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "cost")
    parser.add_argument(
        "--methods", nargs="+", default=PRUNING + MERGING, help="on the testbed; NAME[:k=v,...]"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="the checkpoint of the testbed rows (default: the Mixtral testbed of the source measured)",
    )
    parser.add_argument("--keep", type=int, nargs="+", default=[8, 4], help="experts kept on the testbed")
    parser.add_argument(
        "--verified",
        nargs="*",
        default=["frequency"],
        help="methods also run with the output verified (moeshrink's default), at the first --keep",
    )
    parser.add_argument("--calib-domains", nargs="+", default=["wiki"])
    parser.add_argument("--modes", nargs="+", choices=["memory", "stream"], default=["memory"])
    parser.add_argument("--skip-testbed", action="store_true")
    parser.add_argument("--sizes", type=float, nargs="*", default=[], help="synthetic sizes in GB (streamed)")
    parser.add_argument("--synthetic-methods", nargs="+", default=["frequency", "reap", "msmoe:align=none"])
    parser.add_argument(
        "--synthetic-fp8-block",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        help="synthetic checkpoints in block-FP8",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        help="run every measurement in a memory cgroup of this size (root only)",
    )
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moeshrink-cost"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the jobs (best of N)")
    parser.add_argument(
        "--repeat-below", type=float, default=60, help="repeat only methods whose first run took at most this"
    )
    parser.add_argument(
        "--working-tree", action="store_true", help="import moeshrink as it is now, not the committed HEAD"
    )
    parser.add_argument(
        "--before",
        help="a commit: the --before-methods also run with its src/ (rows 'at commit ...'), same floors",
    )
    parser.add_argument("--before-methods", nargs="+", default=["naee"])
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--notes", type=Path, help="markdown appended under the tables (kept in OUT.json)")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    if args.report_only:
        data = json.loads(json_path.read_text())
        if args.notes:
            data["meta"]["notes"] = ["## Notes", "", *args.notes.read_text().splitlines()]
        data["rows"] = summarize(data["samples"])
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        md_path.write_text(render(data))
        return

    from moeshrink.testbed import paths

    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    cgroup = (
        memory_cgroup(f"moeshrink-cost-{run_id}", args.memory_limit_gib) if args.memory_limit_gib else None
    )
    scratch = args.scratch / run_id
    scratch.mkdir(parents=True)
    source = None if args.working_tree else snapshot_source(scratch)
    before = None
    if args.before:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=7", args.before],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        before = (commit, snapshot_source(scratch / "before", commit))
    script = shutil.copy(__file__, scratch / "cost.py")  # this file may be edited while the run goes on
    data_dir = source / "moeshrink" / "testbed" / "data" if source else paths.DATA
    calib = _freeze_calibration(args.calib_domains, data_dir / "corpus", scratch)
    meta: dict[str, Any] = {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python benchmarks/cost.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": versions(),
        "source": "working tree" if source is None else "git HEAD (src/ unpacked for the run)",
        "before": before[0] if before else None,
        "threads": 1,
        "load_start": list(os.getloadavg()),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "repeat_below": args.repeat_below,
        "calibration": calib,
        "memory_limit_gib": args.memory_limit_gib,
        "model": str(args.model) if args.model else None,
        "notes": ["## Notes", "", *args.notes.read_text().splitlines()] if args.notes else [],
    }
    data: dict[str, Any] = {"meta": meta, "samples": [], "rows": []}

    def record(sample: dict) -> None:
        data["samples"].append(sample | {"run_id": run_id})
        what = sample.get("method", FLOOR) + (f" keep {sample['keep']}" if "keep" in sample else "")
        took = f"{sample['seconds']:.2f}s" if "seconds" in sample else sample.get("error")
        print(f"[{sample['started']}] {group_key(sample)} #{sample['seq']} {what}: {took}", flush=True)
        json_path.write_text(json.dumps(data, indent=1) + "\n")  # a crashed run leaves what it measured

    def spec_of(common: dict) -> Callable[[dict], dict]:
        def measure_one(spec: dict) -> dict:
            job = common | {k: spec[k] for k in ("model", "stream", "kind")}
            if spec["kind"] != FLOOR:
                method, _, opts = spec["method"].partition(":")
                options = dict(o.split("=", 1) for o in filter(None, opts.split(",")))
                job |= {"method": method, "options": options, "keep": spec["keep"]}
                job["verify"] = spec.get("verify", False)
            code = before[1] if spec.get("before") else source
            return measure(job, args.timeout, code, str(script), cgroup)

        return measure_one

    settings = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size}
    settings |= {"scratch": str(scratch)}
    # (name, path, jobs, modes, domains); synthetic checkpoints are written just before their rows
    plan: list[tuple[str, Path, list[dict], list[bool], list[str]]] = []
    if not args.skip_testbed:
        jobs = [{"method": m, "keep": k} for k in args.keep for m in args.methods]
        if before:  # each right after its current row, so both share a floor
            jobs = [
                x
                for job in jobs
                for x in [job]
                + ([job | {"before": before[0]}] if job["method"] in args.before_methods else [])
            ]
        jobs += [{"method": m, "keep": args.keep[0], "verify": True} for m in args.verified]
        modes = [m == "stream" for m in args.modes]
        model = args.model.resolve() if args.model else data_dir / "moeshrink-tiny"
        name = f"testbed {args.model.name}" if args.model else "testbed"
        plan.append((name, model, jobs, modes, args.calib_domains))
    for size in args.sizes:
        name = f"synthetic-{'fp8-' if args.synthetic_fp8_block else ''}{size:g}GB"
        jobs = [{"method": m, "keep": 4} for m in args.synthetic_methods]
        plan.append((name, scratch / name, jobs, [True], args.calib_domains[:1]))
    try:
        for name, path, jobs, modes, domains in plan:
            if not path.exists():
                size = name.removeprefix("synthetic-").removeprefix("fp8-").removesuffix("GB")
                make = [
                    sys.executable,
                    str(HERE / "make_synthetic.py"),
                    "--size-gb",
                    size,
                    "--out",
                    str(path),
                ]
                if args.synthetic_fp8_block:
                    make += ["--fp8-block", *map(str, args.synthetic_fp8_block)]
                subprocess.run(make, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            info = _checkpoint_info(name, path)
            try:
                for stream in modes:
                    for domain in domains:
                        group = info | {"model": str(path), "stream": stream, "domain": domain}
                        common = settings | {"calib": calib[domain]["path"]}
                        run_group(group, jobs, args.repeat, args.repeat_below, spec_of(common), record)
            finally:
                if name.startswith("synthetic-"):  # written for this run
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        meta["load_end"] = list(os.getloadavg())
        data["rows"] = summarize(data["samples"])
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        md_path.write_text(render(data))
        shutil.rmtree(scratch, ignore_errors=True)
        if cgroup is not None:
            cgroup.rmdir()
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
