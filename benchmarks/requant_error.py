"""Re-quantization error of the experts a job changes on a quantized input (issue #15, item 3).

The tiny mixtral of the tests (``moeshrink.testbed.tiny``, bfloat16, 8 experts, 3 layers) is written
as block-FP8 (16x16 tiles, DeepSeek-V3's layout) and in each compressed-tensors preset of
``moeshrink.testbed.ctensors`` (groups of 16, 16x16 blocks), then compressed 8 -> 4 experts per layer
three ways on the testbed's wiki calibration text: M-SMoE merging (with its reconstruction, the
default), Wanda 2:4 inside the experts after frequency pruning, and frequency pruning with
``--recover``. Per run: how many tensors were re-quantized, how many kept the input's scales (zeros
only), and their relative Frobenius error against the computed weights (mean and largest, from the
plan's ``source.quantization.requantization``); beside it, the largest error of the input's own
quantization of an expert tensor (the dense model against the dequantized input), the scale the
re-quantization error is to be read against. A combination refused says why. No timings.

    python benchmarks/requant_error.py --out docs/quantized_requant.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import moeshrink
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import load_model
from moeshrink.testbed.ctensors import quantized_copies
from moeshrink.testbed.paths import corpus_dir
from moeshrink.testbed.tiny import build_tiny_model

RUNS = {
    "merge (msmoe)": {"method": "msmoe"},
    "sparsity (wanda 2:4)": {"method": "frequency", "nm": "2:4"},
    "recover": {"method": "frequency", "recover": True},
}


@torch.no_grad()
def quantization_error(dense: Path, quantized: Path) -> float:
    """The largest relative Frobenius error of the input's own quantization over its expert tensors."""
    a_model, b_model = load_model(dense, "float32").model, load_model(quantized, "float32").model
    worst = 0.0
    for (name, a), (_, b) in zip(a_model.named_parameters(), b_model.named_parameters(), strict=True):
        if ".experts." in name and a.ndim == 3:
            for i in range(a.shape[0]):
                if not torch.equal(a[i], b[i]):
                    worst = max(worst, float((a[i] - b[i]).norm() / a[i].norm()))
    return worst


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
        inputs = quantized_copies(dense, root)
        for name, path in inputs.items():
            own = quantization_error(dense, path)
            for run, fields in RUNS.items():
                out = root / f"out-{len(rows)}"
                try:
                    result = moeshrink.prune(
                        str(path),
                        keep=4,
                        calib=calib,
                        output=out,
                        samples=8,
                        seq_len=64,
                        progress=False,
                        **fields,
                    )
                except MoeShrinkError as e:
                    why = str(e).removeprefix(f"{path} is ").split(" (")[0]  # e.g. static activation scales
                    rows.append(f"| {name} | {run} | refused: {why} | | | | |")
                    continue
                r = result.plan.source["quantization"]["requantization"]
                rows.append(
                    f"| {name} | {run} | {r['tensors']} | {r['kept_scales']} | {r['mean_relative_error']:.4f} | "
                    f"{r['max_relative_error']:.4f} | {own:.4f} |"
                )
    lines = [
        "# Re-quantization error of changed experts on quantized inputs (8 -> 4 experts)",
        "",
        "Made by `python benchmarks/requant_error.py --out docs/quantized_requant.md`: the tests' tiny mixtral",
        "(bfloat16, 3 layers, 8 experts) written in each layout, compressed to 4 experts per layer three ways.",
        "Relative Frobenius error of each re-quantized tensor against the weight the job computed; the last",
        "column is the largest error of the input's own quantization of an expert tensor (dense vs dequantized).",
        "",
        "| input | job | tensors re-quantized | of them scales kept (zeros only) | mean error | largest | input's own (largest) |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
