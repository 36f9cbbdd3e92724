"""Tokenized data kept on disk, so that a second run (and every Ray worker after the first) skips tokenizing.

The key is a hash of everything the encoded result depends on: the rows' content, the format, the
tokenizer (its full serialised definition: vocabulary, merges, normalizer, special tokens, chat template),
the settings (max_length, labels, chat template) and ENCODING_VERSION (bumped whenever an encoder changes).
Renaming or moving a file keeps the hit; editing one row misses.

Entries are .npz files (no pickle: loading one runs no code). Several workers of one node may write the same
entry at once: each writes a temporary file in the cache directory and renames it into place (atomic on
POSIX), so a reader sees a complete entry or none. Nothing is ever evicted: delete the directory to clear it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from orchestrator.data.formats import DataReport, Example
from orchestrator.data.readers import Row

ENCODING_VERSION = 1  # bump when any encoder in formats.py changes what it produces
ENV_DIR = "ORCHESTRATOR_CACHE_DIR"
STATS: Counter = Counter()  # "hit" / "miss" / "write_failed": what the cache did in this process (tests, logs)
log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "orchestrator", "tokenized")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the serialised fast tokenizer (or the vocabulary of a slow one),
    the special tokens and the chat template. Two tokenizers loaded from different paths but identical
    share entries; the same path with a changed vocabulary does not."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)  # call-time state that tokenizing itself changes
        definition.pop("padding", None)
        digest.update(json.dumps(definition, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
             "chat_template": getattr(tokenizer, "chat_template", None),
             "added": sorted((str(k), int(v)) for k, v in tokenizer.get_added_vocab().items())}
    digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()


def rows_fingerprint(rows: Sequence[Row]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.fields, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cache_key(rows: Sequence[Row], tokenizer: str, settings: Dict[str, Any]) -> str:
    """`tokenizer`: its tokenizer_fingerprint() (computed once per run: it hashes the whole vocabulary)."""
    parts = {"version": ENCODING_VERSION, "rows": rows_fingerprint(rows), "tokenizer": tokenizer, "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_encode(rows: Sequence[Row], tokenizer: str, settings: Dict[str, Any],
                  encode: Callable[[], Tuple[List[Example], DataReport]],
                  cache_dir: Optional[str] = None, enabled: bool = True) -> Tuple[List[Example], DataReport]:
    """encode() through the cache: a hit returns the stored examples (report.cached = True).
    `tokenizer` is the tokenizer's fingerprint."""
    if not enabled:
        return encode()
    directory = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    path = os.path.join(directory, cache_key(rows, tokenizer, settings) + ".npz")
    stored = _load(path)
    if stored is not None:
        STATS["hit"] += 1
        return stored
    STATS["miss"] += 1
    examples, report = encode()
    _store(path, examples, report)
    return examples, report


def _load(path: str) -> Optional[Tuple[List[Example], DataReport]]:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            ids, lengths, report = entry["ids"], entry["lengths"], json.loads(str(entry["report"]))
            classes = entry["classes"] if "classes" in entry.files else None
            targets = entry["targets"] if classes is None else None
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        flat_ids = ids.tolist()
        flat_targets = targets.tolist() if targets is not None else None
        examples = [Example(flat_ids[a:b], classes[i].item() if classes is not None else flat_targets[a:b])
                    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        return examples, DataReport(**{**report, "cached": True})
    except Exception as err:  # a damaged or foreign file: tokenize again and overwrite it
        log.warning("tokenization cache entry %s is unreadable (%s); tokenizing again", path, err)
        return None


def _store(path: str, examples: List[Example], report: DataReport) -> None:
    arrays = {"ids": np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32),
              "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int64),
              "report": np.array(json.dumps(asdict(report)))}
    if examples and isinstance(examples[0].target, int):
        arrays["classes"] = np.array([e.target for e in examples], dtype=np.int64)
    else:
        arrays["targets"] = np.fromiter((t for e in examples for t in e.target), dtype=np.int32)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            os.replace(temporary, path)  # atomic: concurrent writers of one key leave one complete entry
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
    except OSError as err:  # a read-only or full disk costs the cache, not the run
        STATS["write_failed"] += 1
        log.warning("cannot write the tokenization cache under %s (%s); set data.cache_dir or data.cache=false",
                    directory, err)
