"""The prepared-data cache: a key over inputs, tokenizer and data config; atomic, lock-guarded publish.

Key = sha256 of (cache format version, every input file's path/size/mtime, the tokenizer's
serialized content + chat template + special tokens, the data config minus fields that cannot
change the result). Entries are written to a temp folder and renamed into place, and a file lock
on `<key>.lock` makes concurrent callers (Tune trials, workers) wait for one writer, then reuse.
Temp folders a killed run left behind are removed by a later run once they are a day old. A damaged
entry (data/plan.py `entry_damage`) is set aside under a temp name and rebuilt: the cache is derived data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from raysft.pipeline.config import NOT_IN_DATA_KEY

CACHE_VERSION = 3  # 2: the tokenizer part of the key is TokenizerSpec.fingerprint(); 3: tool-call ids mapped
NOT_IN_KEY = tuple(k.removeprefix("data.") for k in NOT_IN_DATA_KEY)  # cannot change the prepared rows
TMP_PREFIX = ".tmp-"  # a prepared entry being written
STALE_TMP_S = 24 * 3600  # no live run writes one for a day: a killed run left it


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
        {
            "version": CACHE_VERSION,
            "data": data,
            "train": train_identity,
            "eval": eval_identity,
            "tokenizer": tokenizer_hash,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextlib.contextmanager
def locked(root: Path, key: str) -> Iterator[None]:
    """Exclusive lock on one cache key (blocks until the current holder finishes)."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f"{key}.lock"):
        yield


def remove_stale_temps(root: Path, older_than_s: float = STALE_TMP_S) -> list[Path]:
    """Remove temp folders and files (`.tmp-*` entries, `tokenizers/*.tmp`) older than a day; returns them."""
    cutoff = time.time() - older_than_s
    removed = []
    for path in [*root.glob(TMP_PREFIX + "*"), *root.glob("tokenizers/*.tmp")]:
        try:
            if path.lstat().st_mtime >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:  # another run removed it first, or it is not ours to remove
            pass
    return removed


def set_aside(root: Path, entry: Path) -> None:
    """Move a damaged entry out of the way (a temp name: removed here, or by a later run if that fails)."""
    aside = root / f"{TMP_PREFIX}{entry.name}-damaged-{uuid.uuid4().hex[:8]}"
    os.rename(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place; if another writer won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "stats.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
