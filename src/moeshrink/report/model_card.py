"""The README.md written next to a compressed checkpoint."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from moeshrink.info import ModelInfo
from moeshrink.io.hub import is_hub_id
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.quant import card_lines
from moeshrink.quant.oneshot import card_lines as quantization_lines
from moeshrink.sparsity.accounting import DENSE_NOTE, SparsityReport
from moeshrink.verify.serving import serving_lines


def model_card(
    plan: ModelPlan, before: ModelInfo, after: ModelInfo, name: str, sparsity: SparsityReport | None = None
) -> str:
    """Markdown: what was done, what it kept, what it costs to serve, how to load it."""
    budget = ", ".join(f"{k}={v}" for k, v in plan.budget.items() if k != "per_layer")
    calib = plan.calibration or {}
    lines = [
        f"# {name}",
        "",
        f"Compressed with moeshrink from `{source_name(plan)}` ({plan.source.get('model_type', '?')}) by the "
        f"**{plan.method}** method ({budget}).",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| experts per MoE layer | {before.experts_text} | {after.experts_text} |",
        f"| active experts per token | {before.top_k} | {after.top_k} |",
        f"| parameters | {before.parameters:,} | {after.parameters:,} |",
        f"| routed-expert parameters | {before.expert_parameters:,} | {after.expert_parameters:,} |",
        f"| bytes ({after.dtype}) | {before.bytes:,} | {after.bytes:,} |",
        "",
    ]
    lines += card_lines(plan.source.get("quantization"))
    if sparsity is not None:
        spec = plan.sparsity or {}
        if spec.get("nm"):
            pattern = f"{spec['nm'][0]}:{spec['nm'][1]}"
        elif spec.get("method") == "owl":
            pattern = f"a sparsity per layer from its outliers, {spec.get('sparsity', 0):.1%} on average"
        else:
            pattern = f"{spec.get('sparsity', 0):.1%} per row"
        scope = ", ".join(spec.get("scope", ["experts"]))
        lines += [
            f"Sparsity ({scope}): {spec.get('method')} zeroed weights ({pattern}): "
            f"{sparsity.expert_fraction:.1%} of expert parameters and {sparsity.fraction:.1%} of all parameters "
            f"are zero. {DENSE_NOTE}",
            "",
        ]
        if "total_sparsity" in spec:
            lines += [
                f"Total sparsity asked {spec['total_sparsity']:.1%} of the original in-scope weights: removed "
                f"experts account for {spec['removed_by_experts']:.1%}, zeros inside the survivors for the rest; "
                f"reached {spec.get('total_sparsity_achieved', float('nan')):.2%}.",
                "",
            ]
    if calib:
        lines += [
            f"Calibration: {calib.get('samples')} sequences x {calib.get('seq_len')} tokens "
            f"(seed {calib.get('seed')}) from {calibration_source(calib)}; "
            f"sha256 of the token ids `{calib.get('sha256', '')[:16]}...`.",
            "",
        ]
    lines += recovery_lines(plan)
    lines += quantization_lines(plan.quantization, after.bytes)
    lines += [
        "Which old experts make each new one is in "
        f"[`{PLAN_FILENAME}`]({PLAN_FILENAME}); "
        "`moeshrink apply ORIGINAL --plan moeshrink_plan.json -o OUT` reproduces this checkpoint from the original.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        _serving_note(plan, after),
        "",
        *_verification_lines(plan),
        *serving_lines(plan.serving),
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in plan.versions.items())}.",
        "",
    ]
    return str(ModelCard(f"---\n{card_data(plan).to_yaml()}\n---\n\n" + "\n".join(lines)))


def recovery_lines(plan: ModelPlan) -> list[str]:
    """What the recover step did: its settings and each layer's error before and after."""
    if not plan.recovery:
        return []
    r = plan.recovery
    parts = [p for p, on in (("router rows", r.get("router")), ("down projections", r.get("down"))) if on]
    rows = [
        f"| {lp.layer} | {lp.recovery['before']:.4f} | {lp.recovery['after']:.4f} | {lp.recovery.get('router', '')} |"
        for lp in plan.layers
        if lp.recovery
    ]
    return [
        f"Recovery: the kept experts' {' and '.join(parts)} re-fitted by ridge least squares (ridge "
        f"{r['ridge']:g}) so each layer's routed output matches the original's on the calibration tokens. "
        "Relative error of that output (sum of squared differences over sum of squares), per layer:",
        "",
        "| layer | before | after | router |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def source_name(plan: ModelPlan) -> str:
    """The source model as a reader can know it: its Hub id, or its folder name, never an absolute
    local path (a card is meant to be published)."""
    hub = plan.source.get("hub")
    if hub:
        return f"{hub['repo_id']}` at commit `{hub['commit'][:12]}"
    return Path(plan.source.get("path", "?")).name


def calibration_source(calib: dict) -> str:
    """The calibration text as a reader can know it: file names, or a dataset's name, config and split
    (a local data folder by its folder name)."""
    dataset = calib.get("dataset")
    if dataset is None:
        return ", ".join(Path(f).name for f in calib.get("files", []))
    name = dataset["name"] if is_hub_id(dataset["name"]) else Path(dataset["name"]).name
    parts = [f"config {dataset['config']}"] if dataset.get("config") else []
    parts += [f"split {dataset['split']}"] if dataset.get("split") else []
    parts += ["rendered with the chat template"] if calib.get("chat_template") else []
    return f"the dataset `{name}`" + (f" ({', '.join(parts)})" if parts else "")


def card_data(plan: ModelPlan) -> ModelCardData:
    """The card's metadata: library, task, tags, and the source's own license when its card has one."""
    source_card = Path(plan.source.get("path", "")) / "README.md"
    license_ = None
    if source_card.is_file():
        try:
            license_ = ModelCard.load(source_card).data.license
        except (ValueError, OSError):  # a README without card metadata
            license_ = None
    hub = plan.source.get("hub")
    return ModelCardData(
        base_model=hub["repo_id"] if hub else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license_,
        tags=["moeshrink", "mixture-of-experts", "expert-pruning", plan.method],
    )


def _serving_note(plan: ModelPlan, after: ModelInfo) -> str:
    family = plan.source.get("model_type", "")
    plugin = (
        "vLLM serves it through moeshrink's plugin: install moeshrink in vLLM's environment "
        "(`pip install moeshrink`), then `vllm serve DIR`; without the plugin vLLM refuses its architecture "
        "name (`Moeshrink...ForCausalLM`) rather than serving another model."
    )
    if len(set(after.experts_per_layer)) > 1:
        return (
            f"This {family} checkpoint keeps a different number of experts per layer (config field "
            "`moeshrink_experts_per_layer`) and stores fused expert tensors: load it with "
            "`moeshrink.io.checkpoint.load_model(DIR)`, or `moeshrink eval DIR`; plain `from_pretrained` and "
            f"SGLang build one expert count for every layer and cannot load it. {plugin}"
        )
    note = (
        f"The checkpoint is a standard {family} checkpoint with one expert count for every layer (what vLLM "
        "and SGLang build; the verification below says what was actually loaded and compared). A pruned expert "
        "count may have no tuned fused-MoE kernel configuration in vLLM, which then logs 'Using default MoE config'."
    )
    if any(lp.top_k is not None for lp in plan.layers):
        note += (
            " Layers route to different numbers of experts per token (config field `moeshrink_top_k_per_layer`): "
            "plain transformers reads `num_experts_per_tok`, the largest, and uses it in every layer; "
            "`moeshrink.io.checkpoint.load_model(DIR)` and `moeshrink eval DIR` give each layer its own. "
            + plugin
        )
    transfer = plan.method_options.get("exact_router")
    if transfer:
        note += (
            f" Its router rows are a least-squares fold of the searched router transfer; `{transfer}` holds the "
            "exact transfer (the original router and T per layer), which `moeshrink.io.checkpoint.load_model(DIR)` "
            "and `moeshrink eval DIR` route by (pass `exact_router=False` for the folded rows)."
        )
    return note


def _verification_lines(plan: ModelPlan) -> list[str]:
    """What was verified where (``moeshrink.verify``), or that nothing was."""
    if not plan.verification:
        return ["Not verified after export (`moeshrink verify DIR` checks it in transformers and vLLM).", ""]
    lines = [
        "## Verification",
        "",
        "| check | result | max abs. difference of log-probs | versions |",
        "|---|---|---|---|",
    ]
    for name, check in plan.verification.items():
        diff = check.get("max_abs_diff")
        shown = "" if diff is None else f"{diff:.1e} (tolerance {check.get('tolerance'):g})"
        versions = ", ".join(f"{k} {v}" for k, v in (check.get("versions") or {}).items())
        lines.append(f"| {name} | {check['status']}: {check['detail']} | {shown} | {versions} |")
    return [*lines, ""]
