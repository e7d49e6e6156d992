"""Atomic file writes: a reader (another process, a restarted worker, a crash's aftermath) sees the old file or
the new one, never half of one. Folders are published the same way by their own modules (outputs.py,
data/cache.py, models/source.py's GGUF copy): written under a temporary sibling name, then renamed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to a temporary sibling and rename it over `path` (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
