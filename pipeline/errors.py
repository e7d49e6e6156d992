"""Errors a user can cause. The CLI prints their message (one sentence) and exits non-zero."""

from __future__ import annotations

import re
from collections.abc import Iterator


class RaysftError(Exception):
    """Base for every error that is the user's to fix; the message is one clear sentence."""

    exit_code = 2


class ConfigError(RaysftError):
    """A config file, key, value or override is wrong."""


class DataError(RaysftError):
    """Input data is missing, unreadable or malformed beyond the allowed share of bad rows."""


class ModelError(RaysftError):
    """A model or tokenizer cannot be found, loaded or used as configured."""


class ClusterError(RaysftError):
    """The Ray cluster cannot be reached or cannot fit the requested resources."""


class CheckpointError(RaysftError):
    """A run folder or checkpoint cannot be used: another run's identity, incomplete files, no space to save."""


class WorkerError(RaysftError):
    """A training worker failed (model load, import, out of memory, ...): not the input's fault, exit 1."""

    exit_code = 1


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps (`__cause__`, `__context__`, and the `cause` a Ray task error carries)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]


def user_error(exc: BaseException) -> RaysftError | None:
    """The RaysftError that `exc` wraps, or None when there is none.

    A Ray task error carries its cause, but Ray Data wraps a UDF's exception in its own, and the chain
    does not survive the trip to the driver: then the error is read back from the worker's traceback text.
    """
    for e in causes(exc):
        if isinstance(e, RaysftError) and type(e).__module__.startswith("raysft."):  # not Ray's dual-class copy
            return e
    for e in causes(exc):
        found = _RAISED.findall(str(e))
        kind = _KINDS.get(found[-1][0]) if found else None
        if kind is not None:
            return kind(found[-1][1].strip())
    return None


_RAISED = re.compile(r"raysft\.pipeline\.errors\.(\w+): (.+)")
_KINDS = {
    k.__name__: k for k in (RaysftError, ConfigError, DataError, ModelError, ClusterError, CheckpointError, WorkerError)
}
