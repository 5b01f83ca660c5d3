"""Calibration text -> a deterministic ``[samples, seq_len]`` block of token ids.

Sources: plain text files (one document per file), JSONL (one document per line, text in a chosen
field) and local Hugging Face ``datasets`` directories (``save_to_disk``). Documents are tokenised,
joined with the end-of-text token, cut into non-overlapping windows of ``seq_len`` tokens, and
``samples`` windows are drawn with a seeded generator.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeshrink.errors import MoeShrinkError


@dataclass
class CalibrationData:
    """Token ids for calibration and what they were made from."""

    input_ids: torch.Tensor
    sha256: str
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def check_calibration_files(paths: Sequence[str | Path]) -> None:
    """Each path is a saved datasets directory or a file of UTF-8 text (checked before anything is
    loaded; a text or JSONL file is read through once)."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise MoeShrinkError(f"calibration file not found: {path}")
        if path.is_dir():
            if not _is_hf_dataset_dir(path):
                raise MoeShrinkError(
                    f"{path} is a directory but not a saved datasets directory: pass text/JSONL files instead"
                )
            continue
        check_utf8_text(path)


def check_utf8_text(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text: binary data (a NUL byte: also UTF-16 text) or another
    encoding (invalid UTF-8). Read as text, either would calibrate on replacement characters."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            nul = data.find(0)
            if nul >= 0:
                raise MoeShrinkError(
                    f"{path}: not text (a NUL byte at byte {offset + nul}: binary data or UTF-16): "
                    "calibration files must be UTF-8 text; pass the text itself or convert it"
                )
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise MoeShrinkError(
                    f"{path}: not UTF-8 text (byte {offset - pending + e.start}: another encoding or binary "
                    "data): calibration files must be UTF-8; convert it (e.g. iconv -f latin1 -t utf-8)"
                ) from e
            if not data:
                return
            offset += len(data)


def read_documents(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """Read documents from text files, JSONL files or a local datasets directory."""
    check_calibration_files(paths)
    docs: list[str] = []
    for raw in paths:
        path = Path(raw)
        if _is_hf_dataset_dir(path):
            docs.extend(_read_hf_dataset(path, text_field))
        elif path.suffix == ".jsonl":
            docs.extend(_read_jsonl(path, text_field))
        else:
            docs.append(path.read_text(encoding="utf-8"))  # checked to be UTF-8 above
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MoeShrinkError(f"calibration text is empty: {', '.join(map(str, paths))} holds no text")
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    try:
        return _parse_jsonl(path, text_field)
    except UnicodeDecodeError as e:
        raise MoeShrinkError(
            f"{path}: not UTF-8 text (byte {e.start}): JSONL calibration files must be UTF-8; convert it"
        ) from e


def _parse_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoeShrinkError(
                    f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line"
                ) from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise MoeShrinkError(
                    f"{path}:{number}: no text field '{text_field}'; choose the field with --calib-field"
                )
            docs.append(record[text_field])
    return docs


def _read_hf_dataset(path: Path, text_field: str) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if text_field not in ds.column_names:
        raise MoeShrinkError(
            f"{path}: no column '{text_field}' (columns: {', '.join(ds.column_names)}); choose it with --calib-field"
        )
    return [t for t in ds[text_field] if isinstance(t, str)]


def tokenize_documents(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """One stream of token ids: each document followed by the end-of-text token (when there is one)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    # verbose=False: whole documents are longer than model_max_length on purpose; they are cut later.
    for encoded in tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_calibration(
    tokenizer,
    paths: Sequence[str | Path],
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str = "text",
) -> CalibrationData:
    """Draw ``samples`` windows of ``seq_len`` tokens from the calibration text, deterministically."""
    if samples < 1 or seq_len < 2:
        raise MoeShrinkError(f"need samples >= 1 and seq-len >= 2, got samples={samples}, seq-len={seq_len}")
    docs = read_documents(paths, text_field)
    stream = tokenize_documents(tokenizer, docs)
    windows = stream.numel() // seq_len
    if windows < samples:
        raise MoeShrinkError(
            f"calibration text too short: {stream.numel()} tokens make {windows} windows of {seq_len}, "
            f"{samples} asked; give more text or lower --samples / --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:samples].sort().values
    input_ids = stream[: windows * seq_len].view(windows, seq_len)[chosen].contiguous()
    digest = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()
    info = {
        "files": [str(p) for p in paths],
        "text_field": text_field,
        "documents": len(docs),
        "tokens_available": int(stream.numel()),
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "sha256": digest,
    }
    return CalibrationData(input_ids=input_ids, sha256=digest, info=info)
