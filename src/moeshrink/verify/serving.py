"""Serving cost where users serve: weight bytes and vLLM offline throughput of a checkpoint and of the
checkpoint it was made from, measured in one invocation, each engine in a fresh process.

``moeshrink verify OUT --original SRC --serving`` measures both, prints the ratios and records them in
OUT's plan (``serving``) and model card, naming the engine, its version, the device and the machine's
load, so a card quotes only what was measured and by what. ``benchmarks/serve.py`` measures its table
with the same worker.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import weight_files

SERVING_BEGIN, SERVING_END = "<!-- moeshrink:serving -->", "<!-- /moeshrink:serving -->"


@dataclass(frozen=True)
class ServingSettings:
    """The fixed workload: ``prompts`` prompts of ``prompt_tokens`` tokens, prefill timed alone
    (one new token), then ``new_tokens`` greedy tokens per prompt (end-of-text ignored), best of
    ``repeat`` after a warm-up."""

    prompts: int = 16
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeat: int = 3


def weight_bytes(directory: Path) -> int:
    """Bytes of the checkpoint's weight files (what an engine must hold)."""
    return sum(f.stat().st_size for f in weight_files(directory))


def random_prompts(vocab_size: int, settings: ServingSettings, seed: int = 0) -> list[list[int]]:
    """Seeded random token ids: a workload any checkpoint of this vocabulary can serve (throughput
    depends on the shapes, not on the text)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (settings.prompts, settings.prompt_tokens), generator=generator)
    return ids.tolist()


def measure_throughput(directory: Path, input_ids: list[list[int]], settings: ServingSettings) -> dict:
    """vLLM's prefill and generation tokens/s for ``directory`` in a fresh process."""
    from moeshrink.verify import run_worker

    return run_worker(
        "vllm-speed",
        directory,
        {"input_ids": input_ids, "new_tokens": settings.new_tokens, "repeat": settings.repeat},
    )


def serving_cost(
    models: Mapping[str, Path], input_ids: list[list[int]], settings: ServingSettings = ServingSettings()
) -> dict[str, Any]:
    """Weight bytes and vLLM throughput of each of ``models`` (name -> directory; the first is the
    base of the ratios), one after the other in this invocation, with the load around each."""
    rows: dict[str, dict[str, Any]] = {}
    for name, directory in models.items():
        load_before = os.getloadavg()[0]
        measured = measure_throughput(Path(directory), input_ids, settings)
        rows[name] = {
            "weight_bytes": weight_bytes(Path(directory)),
            "prefill_tokens_per_s": measured["prefill_tokens_per_s"],
            "generation_tokens_per_s": measured["generation_tokens_per_s"],
            "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        engine = measured["engine"]
    base = next(iter(rows.values()))
    for row in rows.values():
        row["ratios"] = {
            k: row[k] / base[k] for k in ("weight_bytes", "prefill_tokens_per_s", "generation_tokens_per_s")
        }
    return {
        "engine": engine,
        "machine": f"{platform.machine()} with {os.cpu_count()} CPU cores",
        "settings": asdict(settings),
        "rows": rows,
    }


def serving_lines(serving: dict[str, Any] | None) -> list[str]:
    """The model card's serving section (between markers, so ``verify --serving`` can replace it)."""
    lines = [SERVING_BEGIN, "## Serving cost", ""]
    if not serving:
        lines += [
            "Not measured. `moeshrink verify DIR --original SOURCE --serving` measures weight bytes and vLLM "
            "throughput of this checkpoint and its source in one run and records them here.",
            "",
            SERVING_END,
        ]
        return lines
    s, engine = serving["settings"], serving["engine"]
    lines += [
        f"Measured by {engine['name']} {engine['version']} on {engine['device']}, {serving['machine']}, "
        f"each model in its checkpoint dtype, one after the other in one run: {s['prompts']} prompts of "
        f"{s['prompt_tokens']} tokens, {s['new_tokens']} new tokens each, best of {s['repeat']}.",
        "",
        "| model | weight bytes | prefill tokens/s | generation tokens/s | load (1 min) |",
        "|---|---|---|---|---|",
    ]
    for name, row in serving["rows"].items():
        r = row["ratios"]
        lines.append(
            f"| {name} | {row['weight_bytes'] / 2**20:,.1f} MiB ({r['weight_bytes']:.2f}x) "
            f"| {row['prefill_tokens_per_s']:,.0f} ({r['prefill_tokens_per_s']:.2f}x) "
            f"| {row['generation_tokens_per_s']:,.0f} ({r['generation_tokens_per_s']:.2f}x) "
            f"| {row['load_1min'][0]:g} -> {row['load_1min'][1]:g} |"
        )
    lines += ["", "Ratios are to the first row."]
    if engine["device"].startswith("CPU"):
        lines[-1] += (
            " On a CPU a step of a small model is mostly fixed overhead, so its throughput ratios say little "
            "about a large model's; the weight bytes hold anywhere."
        )
    lines += ["", SERVING_END]
    return lines


def replace_serving_section(card: str, serving: dict[str, Any]) -> str:
    """``card`` with its serving section replaced by the measured one (appended when it has none)."""
    section = "\n".join(serving_lines(serving))
    start, end = card.find(SERVING_BEGIN), card.find(SERVING_END)
    if start == -1 or end == -1:
        return card.rstrip("\n") + "\n\n" + section + "\n"
    return card[:start] + section + card[end + len(SERVING_END) :]


def record_serving(directory: Path, serving: dict[str, Any]) -> None:
    """Write ``serving`` into the plan and the model card of the moeshrink output ``directory`` (each
    file replaced atomically)."""
    from moeshrink.plan import PLAN_FILENAME, ModelPlan

    plan_file = directory / PLAN_FILENAME
    if not plan_file.is_file():
        raise MoeShrinkError(f"{directory} has no {PLAN_FILENAME}: there is no moeshrink record to add to")
    plan = ModelPlan.load(plan_file)
    plan.serving = serving
    card_file = directory / "README.md"
    card = card_file.read_text(encoding="utf-8") if card_file.is_file() else ""
    _replace_file(plan_file, json.dumps(plan.model_dump(mode="json"), indent=1) + "\n")
    _replace_file(card_file, replace_serving_section(card, serving))


def _replace_file(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


__all__ = [
    "ServingSettings",
    "random_prompts",
    "record_serving",
    "replace_serving_section",
    "serving_cost",
    "serving_lines",
    "weight_bytes",
]
