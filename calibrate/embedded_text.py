"""Text that ships with Python itself, split by document into train / calib / eval.

The split is a pure function of the document id, so the tiny model's training text, the
calibration samples and the held-out evaluation text never overlap, on any machine.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "calib", "eval")

# Standard-library modules whose sources are part of the corpus. Fixed list (not a directory
# walk) so the corpus is identical across CPython patch releases' file additions.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.tasks", "base64", "bisect", "calendar",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.server",
    "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "mailbox",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "zipfile",
)


@dataclass(frozen=True)
class Document:
    id: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.id)


def split_of(doc_id: str) -> str:
    """train for 80% of documents, calib for 10%, eval for 10%, by a hash of the id."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 10
    return "eval" if bucket == 0 else "calib" if bucket == 1 else "train"


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """All embedded documents, sorted by id: pydoc topics first, then stdlib sources."""
    from pydoc_data.topics import topics

    docs = [Document(f"pydoc:{name}", topics[name]) for name in sorted(topics)]
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        docs.append(Document(f"stdlib:{module}", Path(spec.origin).read_text(encoding="utf-8")))
    return tuple(docs)


def split_documents(split: str) -> tuple[Document, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return tuple(d for d in documents() if d.split == split)


def corpus_hash() -> str:
    h = hashlib.sha256()
    for d in documents():
        h.update(d.id.encode())
        h.update(b"\0")
        h.update(d.text.encode())
    return h.hexdigest()
