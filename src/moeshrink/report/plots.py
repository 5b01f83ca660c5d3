"""PNG plots: perplexity by method and domain; expert usage per layer (per domain)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moeshrink.extras import require_extra


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (matplotlib is the ``eval`` extra's)."""
    require_extra("matplotlib", "plotting")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_bars(results: Mapping[str, dict], path: Path, title: str = "Held-out perplexity") -> Path:
    """Grouped bars: one group per domain, one bar per model (log scale: ratios read as distances)."""
    names = list(results)
    domains = list(next(iter(results.values()))["domains"])
    x = np.arange(len(domains))
    width = 0.8 / len(names)
    plt = _pyplot()
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
    plt = _pyplot()
    fig, axes = plt.subplots(
        1,
        len(domains),
        figsize=(3.4 * len(domains) + 1, 3.2),
        squeeze=False,
        layout="constrained",
        sharey=True,
    )
    vmax = max(max(max(row) for row in u) for u in usage.values())
    for ax, d in zip(axes[0], domains, strict=True):
        grid = np.array(usage[d])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xticks(range(0, grid.shape[1], max(1, grid.shape[1] // 8)))
        ax.set_title(d)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="fraction of tokens")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
