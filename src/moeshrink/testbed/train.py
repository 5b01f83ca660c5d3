"""Train the testbed MoEs from scratch on the four-domain testbed corpus.

* ``mixtral`` (``moeshrink-tiny``): Mixtral architecture, 16 experts, top-2, 4 layers, hidden 256,
  with Mixtral's load-balancing loss.
* ``deepseek_v3`` (``moeshrink-tiny-ds3``): the fine-grained shape of current MoEs: DeepSeek-V3
  architecture, 64 routed experts of width 64 in 4 groups (2 chosen per token), top-6, one shared
  expert, a dense first layer, sigmoid routing balanced without a loss by DeepSeek-V3's correction
  bias (after each step every expert's bias moves by ``bias_update`` towards the mean load), the
  router stored in float32.

Each training sequence comes from one domain and every batch holds the same number of sequences
from each domain, so experts can specialise by domain. The result is saved in bf16 with the
testbed tokenizer and a ``training_record.json`` (seed, steps, tokens seen, losses, load, time).

Run ``moeshrink testbed train --out DIR [--shape deepseek_v3]`` (or ``python -m
moeshrink.testbed.train``); about 40 minutes each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    MixtralConfig,
    PretrainedConfig,
)

from moeshrink.engine.data import read_documents, tokenize_documents
from moeshrink.testbed import paths
from moeshrink.testbed.paths import DOMAINS


@dataclass
class TrainSettings:
    steps: int = 1400
    seq_len: int = 256
    sequences_per_domain: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.02
    seed: int = 0
    hidden_size: int = 256
    intermediate_size: int = 256
    layers: int = 4
    experts: int = 16
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2
    shape: str = "mixtral"
    # deepseek_v3 only
    groups: int = 4
    groups_per_token: int = 2
    shared_experts: int = 1
    dense_layers: int = 1
    bias_update: float = 0.001


SHAPES: dict[str, dict] = {
    "mixtral": {},
    # as many active expert parameters per token as the mixtral testbed (6 x 64 + 64 shared vs 2 x 256)
    # bias_update: DeepSeek-V3 used 0.001 over hundreds of thousands of steps; in 1,400 steps 0.001 had
    # not moved the largest expert load below 9.8x the mean by step 200, so the bias moves ten times faster
    "deepseek_v3": dict(
        experts=64, top_k=6, intermediate_size=64, router_aux_loss_coef=0.0, bias_update=0.01
    ),
}
MODEL_NAMES = dict(zip(("mixtral", "deepseek_v3"), paths.TESTBEDS, strict=True))


def testbed_config(s: TrainSettings, vocab_size: int, eos_id: int) -> PretrainedConfig:
    if s.shape == "deepseek_v3":
        return DeepseekV3Config(
            vocab_size=vocab_size,
            hidden_size=s.hidden_size,
            intermediate_size=4 * s.hidden_size,  # the dense first layer
            moe_intermediate_size=s.intermediate_size,
            num_hidden_layers=s.layers,
            first_k_dense_replace=s.dense_layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
            n_routed_experts=s.experts,
            num_experts_per_tok=s.top_k,
            n_group=s.groups,
            topk_group=s.groups_per_token,
            n_shared_experts=s.shared_experts,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=None,
            kv_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_local_experts=s.experts,
        num_experts_per_tok=s.top_k,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=s.router_aux_loss_coef,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def domain_streams(corpus: Path, tokenizer, split: str) -> dict[str, torch.Tensor]:
    """Each domain's split as one token stream (documents joined by end-of-text)."""
    return {
        d: tokenize_documents(tokenizer, read_documents([corpus / d / f"{split}.jsonl"])) for d in DOMAINS
    }


def sample_batch(streams: dict[str, torch.Tensor], per_domain: int, seq_len: int, generator) -> torch.Tensor:
    rows = []
    for d in DOMAINS:
        stream = streams[d]
        starts = torch.randint(0, stream.numel() - seq_len, (per_domain,), generator=generator)
        rows.extend(stream[s : s + seq_len] for s in starts.tolist())
    return torch.stack(rows)


@torch.no_grad()
def domain_losses(
    model, streams: dict[str, torch.Tensor], seq_len: int, max_windows: int = 32
) -> dict[str, float]:
    """Mean next-token loss per domain on up to ``max_windows`` windows of each stream."""
    model.eval()
    out = {}
    for d, stream in streams.items():
        n = min(max_windows, stream.numel() // seq_len)
        ids = stream[: n * seq_len].view(n, seq_len)
        out[d] = float(model(input_ids=ids, labels=ids).loss)
    model.train()
    return out


def _is_router(name: str) -> bool:
    return ".mlp.gate." in name


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: count each expert's tokens in a step (a hook on
    every router), then move each expert's ``e_score_correction_bias`` by ``rate`` up if it got
    fewer than the mean and down if more. The bias changes which experts are chosen, never the
    weights they get."""

    def __init__(self, model, rate: float) -> None:
        self.rate = rate
        self.routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def count(module, args, output) -> None:
            indices = output[2]
            self.loads[i] += torch.bincount(indices.flatten(), minlength=self.loads[i].numel()).float()

        return count

    @torch.no_grad()
    def step(self) -> float:
        """Update every bias from the loads since the last step; returns the largest load over the mean."""
        worst = 0.0
        for router, load in zip(self.routers, self.loads, strict=True):
            mean = load.mean()
            router.e_score_correction_bias += self.rate * torch.sign(mean - load)
            worst = max(worst, float(load.max() / mean)) if mean > 0 else worst
            load.zero_()
        return worst

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def train(corpus: Path, out_dir: Path, settings: TrainSettings, log_every: int = 50) -> dict:
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer_dir())
    train_streams = domain_streams(corpus, tokenizer, "train")
    test_streams = domain_streams(corpus, tokenizer, "test")
    config = testbed_config(settings, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(settings.seed)
    balancer = BiasBalancer(model, settings.bias_update) if settings.shape == "deepseek_v3" else None
    history, recent = [], []
    start = time.time()
    for step in range(settings.steps):
        batch = sample_batch(train_streams, settings.sequences_per_domain, settings.seq_len, generator)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        aux = getattr(out, "aux_loss", None)
        lm_loss = (
            float(out.loss - settings.router_aux_loss_coef * aux) if aux is not None else float(out.loss)
        )
        recent.append(lm_loss)
        imbalance = balancer.step() if balancer is not None else None
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            entry = {
                "step": step + 1,
                "lm_loss": sum(recent) / len(recent),
                "aux_loss": float(aux) if aux is not None else None,
                "max_load_over_mean": imbalance,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.time() - start, 1),
            }
            history.append(entry)
            print(json.dumps(entry), flush=True)
            recent = []
    seconds = time.time() - start
    if balancer is not None:
        balancer.close()
    model.config.output_router_logits = False
    test_losses = domain_losses(model, test_streams, settings.seq_len)
    record = {
        "model": MODEL_NAMES[settings.shape],
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": settings.steps * settings.seq_len * settings.sequences_per_domain * len(DOMAINS),
        "final_train_lm_loss": history[-1]["lm_loss"],
        "test_loss_per_domain": test_losses,
        "test_perplexity_per_domain": {d: math.exp(v) for d, v in test_losses.items()},
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "history": history,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    routers = {
        n: t.detach().clone()
        for n, t in model.state_dict().items()
        if t.dtype == torch.float32 and _is_router(n)
    }
    model.to(torch.bfloat16)
    if settings.shape == "deepseek_v3":  # as DeepSeek-V3 ships: the router and its bias in float32
        model.load_state_dict(routers, strict=False, assign=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", type=Path, default=Path(".cache/testbed/corpus"), help="built corpus directory"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral", help="which testbed")
    args = parser.parse_args(argv)
    settings = TrainSettings(steps=args.steps, seed=args.seed, shape=args.shape, **SHAPES[args.shape])
    record = train(args.corpus, args.out, settings)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
