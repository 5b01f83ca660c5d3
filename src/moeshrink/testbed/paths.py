"""Where the packaged testbed pieces live."""

from __future__ import annotations

from pathlib import Path

from moeshrink.errors import MoeShrinkError

DATA = Path(__file__).resolve().parent / "data"
DOMAINS = ("wiki", "shakespeare", "pydoc", "bible")
# The shipped trained testbeds: the 16-expert top-2 Mixtral (the default everywhere) and the
# DeepSeek-V3-shaped one (64 experts in 4 groups, top-6, a shared expert, a dense first layer).
TESTBEDS = ("moeshrink-tiny", "moeshrink-tiny-ds3")


def testbed_model_dir(name: str = TESTBEDS[0]) -> Path:
    """The directory of the shipped testbed ``name`` (one of ``TESTBEDS``; default: the Mixtral one)."""
    if name not in TESTBEDS:
        raise MoeShrinkError(f"no testbed named {name!r}: the shipped testbeds are {', '.join(TESTBEDS)}")
    path = DATA / name
    if not (path / "config.json").is_file():
        shape = "" if name == TESTBEDS[0] else " --shape deepseek_v3"
        raise MoeShrinkError(
            f"the testbed model is missing from {path}: rebuild it with `moeshrink testbed train{shape}`"
        )
    return path


def corpus_dir() -> Path:
    return DATA / "corpus"


def tasks_dir() -> Path:
    return DATA / "tasks"


def tokenizer_dir() -> Path:
    return DATA / "tokenizer"
