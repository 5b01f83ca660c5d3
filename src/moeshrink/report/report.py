"""The Markdown + JSON report of a comparison run (``moeshrink demo``, the quality benchmark)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from moeshrink.report.plots import perplexity_bars, usage_heatmaps
from moeshrink.report.tables import comparison_rows, headline_accuracy, markdown_table


def domain_expert_information(usage: Mapping[str, list[list[float]]]) -> list[float]:
    """Per layer, the mutual information in bits between the domain (uniform over domains) and the
    chosen expert: 0 when every domain uses the experts alike, log2(#domains) when each domain has
    experts of its own. A measure of how much the experts specialise by domain."""
    domains = list(usage)
    info = []
    for layer in range(len(usage[domains[0]])):
        p = [[max(x, 0.0) for x in usage[d][layer]] for d in domains]
        p = [[x / sum(row) for x in row] for row in p]  # p(expert | domain)
        marginal = [sum(row[e] for row in p) / len(p) for e in range(len(p[0]))]
        info.append(
            sum(row[e] * math.log2(row[e] / marginal[e]) for row in p for e in range(len(row)) if row[e] > 0)
            / len(p)
        )
    return info


def _geomean_ratio(result: dict, base: dict, domains: list[str]) -> float:
    logs = [math.log(result["domains"][d]["perplexity"] / base["domains"][d]["perplexity"]) for d in domains]
    return math.exp(sum(logs) / len(logs))


def write_report(
    out_dir: Path,
    results: Mapping[str, dict],
    *,
    baseline: str,
    title: str,
    intro: str,
    calib_domain: str | None = None,
    details: Mapping[str, dict] | None = None,
) -> Path:
    """Write ``report.md``, ``report.json``, ``perplexity.png`` and ``expert_usage.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    perplexity_bars(results, out_dir / "perplexity.png", title=f"{title}: held-out perplexity")
    base = results[baseline]
    usage = {d: v["expert_usage"] for d, v in base["domains"].items() if "expert_usage" in v}
    if usage:
        usage_heatmaps(usage, out_dir / "expert_usage.png", title=f"Expert usage of {baseline} by domain")
    header, rows = comparison_rows(results, baseline)
    domains = list(base["domains"])
    lines = [f"# {title}", "", intro, "", markdown_table(header, rows), ""]
    lines += [
        "Perplexity is per token on held-out text (x = ratio to the unpruned model); acc is lm-eval's "
        "multiple-choice accuracy (4 choices, chance 0.25), acc_mi the same by mutual information "
        "(lm-eval's acc_mutual_info: log P(choice | passage) - log P(choice)), the rule for moeshrink's "
        "continuation tasks, whose distractors are spans of other documents.",
        "",
    ]
    speed = base.get("speed")
    if speed and "engine" in speed:
        lines += [
            f"Speed (prefill and decode tok/s) is measured by {speed['engine']}: batch {speed['batch_size']} x "
            f"{speed['prompt_len']}-token random prompts, {speed['new_tokens']} new tokens, best of {speed.get('repeats', 3)}. That is "
            "not a serving engine: `moeshrink verify OUT --original MODEL --serving` measures weight bytes and "
            "throughput in vLLM, and docs/serve.md has the testbed's table.",
            "",
        ]
    headline = {t: headline_accuracy(v) for t, v in base.get("tasks", {}).items()}
    below = [
        f"{t} ({name} {value:.3f} ± {stderr:.3f})"
        for t, (name, value, stderr) in headline.items()
        if value + 2 * stderr < 0.25
    ]
    if below:
        lines += [
            f"Below chance for {baseline} itself, so not a measure of quality here: {', '.join(below)}.",
            "",
        ]
    others = [d for d in domains if d != calib_domain]
    summary = []
    for name, r in results.items():
        if name == baseline:
            continue
        cell = {"model": name}
        if calib_domain in domains:
            cell[f"ppl ratio on {calib_domain} (calibrated)"] = _geomean_ratio(r, base, [calib_domain])
        if others:
            cell["ppl ratio on other domains (geomean)"] = _geomean_ratio(r, base, others)
        summary.append(cell)
    if summary:
        keys = list(summary[0])
        lines += ["## Perplexity ratio to the unpruned model", ""]
        lines.append(
            markdown_table(keys, [[c["model"]] + [f"{c[k]:.3f}" for k in keys[1:]] for c in summary])
        )
        lines.append("")
        best = min(summary, key=lambda c: c[keys[-1]])
        lines += [f"Lowest ratio ({keys[-1]}): **{best['model']}** ({best[keys[-1]]:.3f}).", ""]
    lines += ["![perplexity](perplexity.png)", ""]
    if usage:
        lines += [
            f"## Expert usage of {baseline}",
            "",
            "Fraction of tokens routed to each expert, per layer and held-out domain (rows sum to top-k).",
            "Mutual information between domain and chosen expert, per layer (bits; 0 = no specialisation, "
            f"{math.log2(len(usage)):.0f} = an expert set per domain): "
            + ", ".join(f"{x:.2f}" for x in domain_expert_information(usage))
            + ".",
            "",
            "![expert usage](expert_usage.png)",
            "",
        ]
    if details:
        lines += ["## Runs", ""]
        for name, d in details.items():
            lines.append(f"- **{name}**: " + "; ".join(f"{k}: {v}" for k, v in d.items()))
        lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))
    payload = {"title": title, "baseline": baseline, "calib_domain": calib_domain, "results": results}
    payload["details"] = dict(details or {})
    (out_dir / "report.json").write_text(json.dumps(payload, indent=1) + "\n")
    return out_dir / "report.md"
