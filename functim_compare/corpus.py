"""The text the model learns: Python standard-library sources by default, or the user's own text
files (``--data``). Nothing is downloaded."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py",
    "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "pprint.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py", "tokenize.py", "typing.py",
)
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
EVAL_FRACTION = 0.1
MIN_CORPUS_CHARS = 100_000
STDLIB_SOURCE = "Python standard library"


class CorpusError(RuntimeError):
    """The text to train on is missing or unusable: reported as one line."""


@dataclass
class Corpus:
    """Token ids of the train and eval splits (int64), and where they came from."""

    train: torch.Tensor
    eval: torch.Tensor
    files: list[str]
    source: str = STDLIB_SOURCE
    unknown_chars: int = 0  # characters outside VOCAB, read as "?"
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """SHA-256 of the token ids of both splits: what a run learns from, whatever the files'
        names."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for split in (self.train, self.eval):
                h.update(len(split).to_bytes(8, "little"))
                h.update(bytes(split.to(torch.uint8).tolist()))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def check_fits(self, block_size: int) -> None:
        """Raise :class:`CorpusError` unless each split holds one context window plus its
        next-character target."""
        need = block_size + 2
        if len(self.train) < need or len(self.eval) < need:
            total = len(self.train) + len(self.eval)
            raise CorpusError(
                f"{total:,} characters of text are too few for one batch: the train split and "
                f"the eval split (the last {EVAL_FRACTION:.0%} of each file) each need at least "
                f"{need} characters (context {block_size} + 2), so about "
                f"{int(need / EVAL_FRACTION):,} characters in all")


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text``: its index in :data:`VOCAB`, ``?`` for anything else."""
    lut = torch.full((256,), VOCAB.index("?"), dtype=torch.int64)
    for i, ch in enumerate(VOCAB):
        lut[ord(ch)] = i
    raw = torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8)
    return lut[raw.long()]


def _split(texts: Sequence[str]) -> tuple[str, str]:
    """The first 90% of every text (joined by blank lines) and the last 10%."""
    cuts = [int(len(t) * (1 - EVAL_FRACTION)) for t in texts]
    train = "\n\n".join(t[:c] for t, c in zip(texts, cuts))
    held = "\n\n".join(t[c:] for t, c in zip(texts, cuts))
    return train, held


def load_corpus() -> Corpus:
    """The standard-library sources of :data:`STDLIB_FILES` that exist in this interpreter."""
    root = sysconfig.get_paths()["stdlib"]
    texts, files = [], []
    for rel in STDLIB_FILES:
        path = os.path.join(root, *rel.split("/"))
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError:
            continue
        files.append(rel)
    train, held = _split(texts)
    if len(train) + len(held) < MIN_CORPUS_CHARS:
        raise CorpusError(f"found only {len(train) + len(held)} characters of Python sources "
                          f"under {root}; the default corpus needs the standard library's .py "
                          "files")
    return Corpus(encode(train), encode(held), files)


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise CorpusError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CorpusError(f"{path} is a directory; name the files (e.g. {path}/*.txt)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read it: {e.strerror}") from None
    if b"\0" in raw:
        raise CorpusError(f"{path} is not a text file (it contains NUL bytes)")
    return raw.decode("utf-8", errors="replace")


def load_text_files(paths: Sequence[str]) -> Corpus:
    """The user's text files, decoded as UTF-8, each split 90/10 into train and eval like the
    default corpus. Characters outside :data:`VOCAB` are read as ``?`` and counted."""
    texts = [_read_text(p) for p in paths]
    train, held = (encode(t) for t in _split(texts))
    question = VOCAB.index("?")
    read_as_question = int((train == question).sum()) + int((held == question).sum())
    return Corpus(train, held, [os.path.abspath(p) for p in paths], source="--data",
                  unknown_chars=read_as_question - sum(t.count("?") for t in texts))
