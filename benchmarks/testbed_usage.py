"""Expert usage of the unpruned testbed by domain: the figure and numbers of docs/testbed.md.

Evaluates the shipped testbed on one held-out split (perplexity windows only: no tasks, no speed),
with the routing observed per domain, and writes the heat maps (OUT.png), the usage fractions and
the per-layer mutual information between domain and chosen expert, each layer's load balance and
each domain's perplexity (OUT.json), and prints the lines docs/testbed.md quotes: the information and
load balance per layer and, per layer and domain, the experts that receive the most tokens. Layers
are counted among the MoE layers (the DeepSeek-V3 testbed's first, dense, layer is not one).

    python benchmarks/testbed_usage.py --split test --out docs/testbed_expert_usage
    python benchmarks/testbed_usage.py --model src/moeshrink/testbed/data/moeshrink-tiny-ds3 --split test --out docs/testbed_ds3_expert_usage
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeshrink.evaluate.suite import evaluate_model
from moeshrink.io.checkpoint import load_model
from moeshrink.report.plots import usage_heatmaps
from moeshrink.report.report import domain_expert_information
from moeshrink.testbed.paths import testbed_model_dir


def top_experts(fractions: list[float], n: int = 3) -> list[tuple[int, float]]:
    """The ``n`` experts with the largest share of tokens, as (expert, share), largest first."""
    order = sorted(range(len(fractions)), key=lambda e: (-fractions[e], e))
    return [(e, fractions[e]) for e in order[:n]]


def load_balance(usage: dict[str, list[list[float]]], tokens: dict[str, int]) -> list[dict]:
    """Per layer, the load of every expert on all domains' tokens together (each domain weighted by its
    tokens), against the mean load: the busiest and least busy expert and how many get under a tenth."""
    total = sum(tokens.values())
    out = []
    for layer in range(len(next(iter(usage.values())))):
        experts = len(usage[next(iter(usage))][layer])
        load = [sum(tokens[d] * usage[d][layer][e] for d in usage) / total for e in range(experts)]
        mean = sum(load) / experts
        out.append(
            {
                "max_over_mean": max(load) / mean,
                "min_over_mean": min(load) / mean,
                "below_tenth_of_mean": sum(x < 0.1 * mean for x in load),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/testbed_expert_usage"))
    parser.add_argument("--model", type=Path, help="checkpoint (default: the Mixtral testbed)")
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per domain at most")
    args = parser.parse_args()
    model_dir = args.model or testbed_model_dir()
    loaded = load_model(model_dir)
    result = evaluate_model(
        loaded.model, loaded.tokenizer, split=args.split, max_tokens=args.eval_tokens, speed=False
    )
    usage = {d: r["expert_usage"] for d, r in result["domains"].items()}
    information = domain_expert_information(usage)
    balance = load_balance(usage, {d: r["tokens"] for d, r in result["domains"].items()})
    usage_heatmaps(
        usage, args.out.with_suffix(".png"), title=f"Expert usage of {model_dir.name} ({args.split})"
    )
    data = {
        "command": "python benchmarks/testbed_usage.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "split": args.split,
        "tokens": {d: r["tokens"] for d, r in result["domains"].items()},
        "perplexity": {d: r["perplexity"] for d, r in result["domains"].items()},
        "mutual_information_bits": information,
        "load_balance": balance,
        "usage": usage,
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print("perplexity: " + ", ".join(f"{d} {r['perplexity']:.2f}" for d, r in result["domains"].items()))
    print("mutual information per layer (bits): " + ", ".join(f"{x:.2f}" for x in information))
    for layer, b in enumerate(balance):
        print(
            f"layer {layer} load over the four domains: busiest expert {b['max_over_mean']:.2f}x the mean, "
            f"least busy {b['min_over_mean']:.2f}x, {b['below_tenth_of_mean']} experts under 0.1x"
        )
    for layer in range(len(information)):
        for domain, fractions in usage.items():
            top = ", ".join(f"{e}: {share:.0%}" for e, share in top_experts(fractions[layer]))
            print(f"layer {layer} {domain}: {top}")
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
