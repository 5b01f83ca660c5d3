"""PNG plots: perplexity by method and domain; expert usage per layer (per domain)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def perplexity_bars(results: Mapping[str, dict], path: Path, title: str = "Held-out perplexity") -> Path:
    """Grouped bars: one group per domain, one bar per model (log scale: ratios read as distances)."""
    names = list(results)
    domains = list(next(iter(results.values()))["domains"])
    x = np.arange(len(domains))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) + 0.4 * len(names)), 4))
    for i, name in enumerate(names):
        values = [results[name]["domains"][d]["perplexity"] for d in domains]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, domains)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def usage_heatmaps(usage: Mapping[str, list[list[float]]], path: Path, title: str = "Expert usage") -> Path:
    """One heat map per domain: rows = MoE layers, columns = experts, colour = fraction of tokens routed."""
    domains = list(usage)
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 2.8), squeeze=False)
    vmax = max(max(max(row) for row in u) for u in usage.values())
    for ax, d in zip(axes[0], domains, strict=True):
        image = ax.imshow(np.array(usage[d]), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(d)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="fraction of tokens")
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
