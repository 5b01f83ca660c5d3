"""Tensor bytes of quantized inputs pruned with their experts kept bit-exact (issue #15).

The tiny mixtral of the tests (``moeshrink.testbed.tiny``, bfloat16, 8 experts, 3 layers) is written
as block-FP8 (16x16 tiles, DeepSeek-V3's layout) and in each compressed-tensors preset of
``moeshrink.testbed.ctensors`` (groups of 16, 16x16 blocks), then pruned 8 -> 4 experts per layer
with ``frequency`` on the testbed's wiki calibration text; the table gives the bytes of
safetensors tensors before and after (``source.quantization`` of the plan, which equals the output
index's ``total_size``), next to the bfloat16 original pruned the same way.

    python benchmarks/quantized_bytes.py --out docs/quantized_bytes.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import moeshrink
from moeshrink.io.streaming import ShardReader
from moeshrink.testbed.ctensors import quantized_copies
from moeshrink.testbed.paths import corpus_dir
from moeshrink.testbed.tiny import build_tiny_model


def main() -> None:
    """Write the table to ``--out`` (and print it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    calib = corpus_dir() / "wiki" / "calib.jsonl"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense = build_tiny_model("mixtral", root / "dense", seed=1, dtype=torch.bfloat16)
        inputs = {"bfloat16 (unquantized)": dense} | quantized_copies(dense, root)
        for name, path in inputs.items():
            out = root / f"out-{len(rows)}"
            moeshrink.prune(
                str(path),
                method="frequency",
                keep=4,
                calib=calib,
                output=out,
                samples=8,
                seq_len=64,
                progress=False,
            )
            rows.append((name, ShardReader(path).total_bytes, ShardReader(out).total_bytes))
    lines = [
        "# Tensor bytes of quantized inputs pruned 8 -> 4 experts (kept experts bit-exact)",
        "",
        "Made by `python benchmarks/quantized_bytes.py --out docs/quantized_bytes.md`: the tests' tiny mixtral",
        "(bfloat16, 3 layers, 8 experts) written in each layout, pruned with `frequency --keep 4`.",
        "",
        "| input | tensor bytes before | after | after / before |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {before:,} | {after:,} | {after / before:.3f} |" for name, before, after in rows]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
