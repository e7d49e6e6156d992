"""Output folders that never destroy anything (`prepare --output`, `export --output`).

Everything is written into a temporary sibling of the output folder and swapped in only when the
command succeeded, so a failed run leaves the previous output as it was. A folder raysft wrote
carries a marker file; an output folder that is not empty and carries no marker (someone else's
files), and an output that is, contains or lies inside one of the command's inputs, are refused
before anything is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from raysft.pipeline.errors import ConfigError

MARKER = ".raysft-output"  # JSON: {"kind": "prepare" | "export"}
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths atomically


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike], flag: str = "--output"
) -> Iterator[Path]:
    """Yield a temporary sibling folder to write `kind`'s output into; on success it becomes `target`.

    Refuses (ConfigError, one sentence naming `flag`) before anything is written when `target` is not
    a folder, is not empty and was not written by raysft, or overlaps one of `inputs`.
    """
    out = Path(os.path.abspath(Path(target).expanduser()))
    check_output(out, kind, inputs, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(out: Path, kind: str, inputs: Iterable[str | os.PathLike], flag: str = "--output") -> None:
    """The refusals of `atomic_output`, on their own."""
    real = Path(os.path.realpath(out))
    for item in inputs:
        if not os.path.lexists(Path(item).expanduser()):  # e.g. a hub id: nothing here to overwrite
            continue
        src = Path(os.path.realpath(Path(item).expanduser()))
        if real == src or real in src.parents:
            raise ConfigError(f"{flag} {out} contains the input {item}; choose a folder that holds none of the inputs.")
        if src in real.parents:
            raise ConfigError(f"{flag} {out} lies inside the input {item}; choose a folder outside the inputs.")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a folder.")
    if not any(out.iterdir()):
        return
    written = _marker_kind(out)
    if written is None:
        raise ConfigError(
            f"{flag} {out} is not empty and was not written by raysft (no {MARKER} file); choose a new or empty folder."
        )
    if written != kind:
        raise ConfigError(f"{flag} {out} holds a raysft {written} output, not a {kind} output; choose another folder.")


def _marker_kind(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / MARKER).read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _swap_in(tmp: Path, out: Path) -> None:
    """Make `tmp` the folder at `out`: a rename when `out` is absent, else an atomic exchange (Linux
    renameat2), else two renames; the previous output is removed only after the new one is in place."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the previous output
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
