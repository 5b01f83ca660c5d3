"""Expert usage of the unpruned testbed by domain: the figure and numbers of docs/testbed.md.

Evaluates the shipped testbed on one held-out split (perplexity windows only: no tasks, no speed),
with the routing observed per domain, and writes the heat maps (OUT.png), the usage fractions and
the per-layer mutual information between domain and chosen expert (OUT.json), and prints the
lines docs/testbed.md quotes: the information per layer and, per layer and domain, the experts that
receive the most tokens.

    python benchmarks/testbed_usage.py --split test --out docs/testbed_expert_usage
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/testbed_expert_usage"))
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per domain at most")
    args = parser.parse_args()
    loaded = load_model(testbed_model_dir())
    result = evaluate_model(
        loaded.model, loaded.tokenizer, split=args.split, max_tokens=args.eval_tokens, speed=False
    )
    usage = {d: r["expert_usage"] for d, r in result["domains"].items()}
    information = domain_expert_information(usage)
    usage_heatmaps(
        usage, args.out.with_suffix(".png"), title=f"Expert usage of moeshrink-tiny ({args.split})"
    )
    data = {
        "command": "python benchmarks/testbed_usage.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "split": args.split,
        "tokens": {d: r["tokens"] for d, r in result["domains"].items()},
        "mutual_information_bits": information,
        "usage": usage,
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print("mutual information per layer (bits): " + ", ".join(f"{x:.2f}" for x in information))
    for layer in range(len(information)):
        for domain, fractions in usage.items():
            top = ", ".join(f"{e}: {share:.0%}" for e, share in top_experts(fractions[layer]))
            print(f"layer {layer} {domain}: {top}")
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
