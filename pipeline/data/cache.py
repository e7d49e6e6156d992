"""The prepared-data cache: a key over inputs, tokenizer and data config; atomic, lock-guarded publish.

Key = sha256 of (cache format version, every input file's path/size/mtime, the tokenizer's
serialized content + chat template + special tokens, the data config minus fields that cannot
change the result). Entries are written to a temp folder and renamed into place, and an flock
on `<key>.lock` makes concurrent callers (Tune trials, workers) wait for one writer, then reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

CACHE_VERSION = 2  # 2: the tokenizer part of the key is TokenizerSpec.fingerprint()
NOT_IN_KEY = ("cache_dir", "num_tokenizer_actors")  # cannot change the prepared rows


def cache_root(cfg) -> Path | str:
    """The cache folder, or its URI when data.cache_dir is on an object store."""
    root = cfg.data.cache_dir or os.path.join("~", ".cache", "raysft", "prepared")
    if "://" in root and not root.startswith("file://"):
        return root.rstrip("/")
    return Path(os.path.expanduser(root.removeprefix("file://"))).resolve()


def lock_root() -> Path:
    """Where the locks of a remote cache live on this machine."""
    return Path(os.path.expanduser(os.path.join("~", ".cache", "raysft", "locks")))


def prepared_key(data_config: dict, train_identity: list, eval_identity: list, tokenizer_hash: str) -> str:
    data = {k: v for k, v in data_config.items() if k not in NOT_IN_KEY}
    blob = json.dumps(
        {"version": CACHE_VERSION, "data": data, "train": train_identity, "eval": eval_identity, "tokenizer": tokenizer_hash},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextlib.contextmanager
def locked(root: Path, key: str) -> Iterator[None]:
    """Exclusive lock on one cache key (blocks until the current holder finishes)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place; if another writer won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "stats.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
