"""Train ``moeshrink-tiny``: a Mixtral-architecture MoE (16 experts, top-2, 4 layers, hidden 256)
trained from scratch on the four-domain testbed corpus, with the load-balancing loss.

Each training sequence comes from one domain and every batch holds the same number of sequences
from each domain, so experts can specialise by domain. The result is saved in bf16 with the
testbed tokenizer and a ``training_record.json`` (seed, steps, tokens seen, losses, time).

Run ``moeshrink testbed train`` (or ``python -m moeshrink.testbed.train``); about 30 minutes on 2 CPU cores.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

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


def testbed_config(s: TrainSettings, vocab_size: int, eos_id: int) -> MixtralConfig:
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
        lm_loss = float(out.loss - settings.router_aux_loss_coef * out.aux_loss)
        recent.append(lm_loss)
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            entry = {
                "step": step + 1,
                "lm_loss": sum(recent) / len(recent),
                "aux_loss": float(out.aux_loss),
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.time() - start, 1),
            }
            history.append(entry)
            print(json.dumps(entry), flush=True)
            recent = []
    seconds = time.time() - start
    model.config.output_router_logits = False
    test_losses = domain_losses(model, test_streams, settings.seq_len)
    record = {
        "model": "moeshrink-tiny",
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
    model.to(torch.bfloat16).save_pretrained(out_dir)
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
    args = parser.parse_args(argv)
    record = train(args.corpus, args.out, TrainSettings(steps=args.steps, seed=args.seed))
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
