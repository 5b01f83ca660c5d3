"""Comparison tables (Markdown and plain text) from evaluation results."""

from __future__ import annotations

from collections.abc import Mapping


def _domains(results: Mapping[str, dict]) -> list[str]:
    first = next(iter(results.values()))
    return list(first["domains"])


def _tasks(results: Mapping[str, dict]) -> list[str]:
    first = next(iter(results.values()))
    return list(first.get("tasks", {}))


def headline_accuracy(metrics: Mapping[str, float]) -> tuple[str, float, float]:
    """(name, value, stderr) of the accuracy a table shows for one task: ``acc_mi`` (lm-eval's
    ``acc_mutual_info``: the choice with the largest log P(choice | passage) - log P(choice)) where the
    task reports it, as moeshrink's continuation tasks do, else lm-eval's ``acc``. Their distractors are
    spans of other documents; for spans drawn independently of the passage, the posterior that a
    choice is the true continuation is proportional to P(choice | passage) / P(choice): ``acc``
    instead favours choices that are likely anywhere, and the unpruned testbed scored below chance by
    it on wiki."""
    if "acc_mutual_info" in metrics:
        return "acc_mi", metrics["acc_mutual_info"], metrics.get("acc_mutual_info_stderr", 0.0)
    return "acc", metrics["acc"], metrics.get("acc_stderr", 0.0)


def comparison_rows(
    results: Mapping[str, dict], baseline: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per model; perplexity per domain (with the ratio to ``baseline``),
    task accuracy, experts, parameter bytes, speed."""
    domains, tasks = _domains(results), _tasks(results)
    header = ["model", "experts", "top-k", "MiB"]
    first = next(iter(results.values())).get("tasks", {})
    header += [f"ppl {d}" for d in domains] + [f"{headline_accuracy(first[t])[0]} {t}" for t in tasks]
    header += ["prefill tok/s", "decode tok/s"]
    rows = []
    base = results.get(baseline) if baseline else None
    for name, r in results.items():
        row = [name, str(r["experts_per_layer"][0]), str(r["top_k"]), f"{r['parameter_bytes'] / 2**20:.1f}"]
        for d in domains:
            ppl = r["domains"][d]["perplexity"]
            cell = f"{ppl:.2f}"
            if base is not None and name != baseline:
                cell += f" (x{ppl / base['domains'][d]['perplexity']:.2f})"
            row.append(cell)
        for t in tasks:
            row.append(f"{headline_accuracy(r['tasks'][t])[1]:.3f}")
        speed = r.get("speed", {})
        row += [
            f"{speed.get('prefill_tokens_per_s', float('nan')):.0f}",
            f"{speed.get('decode_tokens_per_s', float('nan')):.0f}",
        ]
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    )
