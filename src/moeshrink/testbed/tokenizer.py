"""Train the testbed's byte-level BPE tokenizer on the corpus train splits.

The tokenizer is GPT-2 style: byte-level pre-tokenizer and decoder (any text round-trips exactly),
one special token ``<|endoftext|>`` that serves as bos, eos, pad and unk, and no special tokens
added by ``encode`` (put ``<|endoftext|>`` between documents yourself). It is saved as a Hugging
Face tokenizer, loadable with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.

Run ``python -m moeshrink.testbed.tokenizer --out DIR CORPUS/*/train.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
#: Characters of text taken from each training file, so that every domain weighs the same.
DEFAULT_CHARS_PER_FILE = 3_000_000


def sample_texts(path: Path, *, max_chars: int, seed: int = 0) -> list[str]:
    """Return a seeded random sample of the documents of a JSONL file, about ``max_chars`` in all.

    Documents are shuffled with a generator seeded by ``seed`` and the file's last two path parts
    (e.g. ``wiki/train.jsonl``), then taken whole until ``max_chars`` is reached.
    """
    texts = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                text = json.loads(line)["text"]
                if text:
                    texts.append(text)
    rng = random.Random(f"{seed}:{'/'.join(Path(path).parts[-2:])}")
    rng.shuffle(texts)
    out, used = [], 0
    for text in texts:
        if used >= max_chars:
            break
        out.append(text)
        used += len(text)
    return out


def _batches(texts: list[str], size: int = 256) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def train_tokenizer(
    train_files: list[Path],
    out_dir: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    seed: int = 0,
    max_chars_per_file: int = DEFAULT_CHARS_PER_FILE,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE on an even sample of ``train_files`` and save it to ``out_dir``.

    Each file (one per domain) contributes at most ``max_chars_per_file`` characters, sampled by
    :func:`sample_texts`. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not train_files:
        raise ValueError("train_tokenizer needs at least one training file")
    missing = [str(p) for p in train_files if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer training files not found: {missing}; build the corpus first "
            f"(python -m moeshrink.testbed.corpus)"
        )
    texts: list[str] = []
    for path in train_files:
        texts.extend(sample_texts(Path(path), max_chars=max_chars_per_file, seed=seed))
    # Interleave the domains so that training does not see them one after another.
    random.Random(seed).shuffle(texts)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train the tokenizer on the given train.jsonl files."""
    parser = argparse.ArgumentParser(
        prog="python -m moeshrink.testbed.tokenizer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("train_files", type=Path, nargs="+", help="train.jsonl files, one per domain")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chars-per-file",
        type=int,
        default=DEFAULT_CHARS_PER_FILE,
        help="characters sampled from each file (default %(default)s)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = train_tokenizer(
            args.train_files,
            args.out,
            args.vocab_size,
            seed=args.seed,
            max_chars_per_file=args.chars_per_file,
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote tokenizer to {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
