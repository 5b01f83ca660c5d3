"""lm-eval's Hugging Face model with each context run once for all of its continuations.

A multiple-choice item asks lm-eval for ``log P(choice | context)`` of every choice; lm-eval's ``HFLM``
runs ``context + choice`` whole for each, so the context, most of the tokens, is computed once per
choice. :class:`SharedPrefixLM` runs the distinct contexts of a batch once (``use_cache``), copies
their key/value cache to each continuation and runs only the continuations after it: the same
log-probabilities (the same positions, attention and routing; only floating-point rounding of the
differently shaped matrix products differs), with about half the tokens on the testbed's
continuation tasks. Log-probabilities are taken in float32 (``logit - logsumexp``), whatever
``softmax_dtype``. Requests it cannot share this way (too long for the model, an empty context, or a
cache other than plain per-layer keys and values, e.g. sliding-window attention) go to ``HFLM``'s own
loop.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

# A request as HFLM._loglikelihood_tokens receives it: (cache key, context tokens, continuation tokens).
Request = tuple[Any, list[int], list[int]]

#: Distinct contexts run together, and continuations run together after them.
CONTEXTS_PER_BATCH = 8
ROWS_PER_PASS = 32


class SharedPrefixLM(HFLM):
    """``HFLM`` whose log-likelihoods run each distinct context once per batch (see the module)."""

    def _can_share(self) -> bool:
        """A causal model whose cache is plain per-layer key/value tensors (no sliding window)."""
        if self.backend != "causal":
            return False
        from transformers.cache_utils import DynamicCache, DynamicLayer

        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # a config this transformers cannot build a cache from
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if not self._can_share():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        fits = [
            i for i, (_, ctx, cont) in enumerate(requests) if ctx and len(ctx) + len(cont) <= self.max_length
        ]
        rest = sorted(set(range(len(requests))) - set(fits))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if rest:
            for i, answer in zip(
                rest, super()._loglikelihood_tokens([requests[i] for i in rest], True), strict=True
            ):
                results[i] = answer
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in fits:
            groups.setdefault(tuple(requests[i][1]), []).append(i)
        # longest first, like HFLM: batches of similar length pad little
        contexts = sorted(groups, key=lambda c: (-len(c), c))
        with tqdm(
            total=len(fits), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"
        ) as bar:
            for start in range(0, len(contexts), CONTEXTS_PER_BATCH):
                batch = contexts[start : start + CONTEXTS_PER_BATCH]
                rows = [(g, i) for g, ctx in enumerate(batch) for i in groups[ctx]]
                answers = self._score_batch(batch, [requests[i][2] for _, i in rows], [g for g, _ in rows])
                for (_, i), answer in zip(rows, answers, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(rows))
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(
        self, contexts: list[tuple[int, ...]], continuations: list[list[int]], owner: list[int]
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy) of each continuation after its context ``owner[r]``."""
        device = self.device
        ctx_lens = torch.tensor([len(c) for c in contexts], device=device)
        prefix = torch.zeros(len(contexts), int(ctx_lens.max()), dtype=torch.long, device=device)
        prefix_mask = torch.zeros_like(prefix)
        for g, ctx in enumerate(contexts):
            prefix[g, : len(ctx)] = torch.tensor(ctx, device=device)
            prefix_mask[g, : len(ctx)] = 1
        # the first continuation token is predicted at the context's last position: only there are
        # logits needed (the output layer is a large share of a small model's work)
        last, where = torch.unique(ctx_lens - 1, return_inverse=True)
        out = self.model(input_ids=prefix, attention_mask=prefix_mask, use_cache=True, logits_to_keep=last)
        first = out.logits[torch.arange(len(contexts), device=device), where].float()  # [contexts, vocab]
        layers = out.past_key_values.layers
        saved = [(layer.keys, layer.values) for layer in layers]
        answers: list[tuple[float, bool] | None] = [None] * len(continuations)
        # continuations of similar length together, a few contexts' worth at a time
        order = sorted(range(len(continuations)), key=lambda r: -len(continuations[r]))
        for start in range(0, len(order), ROWS_PER_PASS):
            rows = order[start : start + ROWS_PER_PASS]
            index = torch.tensor([owner[r] for r in rows], device=device)
            width = len(continuations[rows[0]])
            tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
            for j, r in enumerate(rows):
                tokens[j, : len(continuations[r])] = torch.tensor(continuations[r], device=device)
                mask[j, : len(continuations[r])] = True
            logits = first[index][:, None]  # [rows, 1, vocab]: the first token
            if width > 1:
                for layer, (keys, values) in zip(layers, saved, strict=True):
                    layer.keys, layer.values = keys[index], values[index]  # one copy per continuation
                following = self.model(
                    input_ids=tokens[:, :-1],
                    attention_mask=torch.cat([prefix_mask[index], mask[:, :-1].long()], dim=1),
                    position_ids=ctx_lens[index][:, None] + torch.arange(width - 1, device=device),
                    past_key_values=out.past_key_values,
                ).logits
                logits = torch.cat([logits, following.float()], dim=1)  # [rows, width, vocab]
            # log p(token) = logit(token) - logsumexp(logits), in float32
            logprobs = logits.gather(2, tokens[..., None]).squeeze(2) - torch.logsumexp(logits, dim=2)
            greedy = (logits.argmax(dim=2) == tokens) | ~mask
            sums = logprobs.masked_fill(~mask, 0.0).sum(dim=1)
            for j, r in enumerate(rows):
                answers[r] = (float(sums[j]), bool(greedy[j].all()))
        return answers  # type: ignore[return-value]
