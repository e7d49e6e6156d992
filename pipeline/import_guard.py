"""The bare names `kernels` and `pipeline` find the installed PyPI packages, never a raysft checkout's folders.

raysft's source tree has two top-level folders, `kernels/` and `pipeline/`, installed as `raysft.kernels` and
`raysft.pipeline`. Under their bare names they are other projects' PyPI packages: transformers 5.25 requires
PyPI's `kernels` and imports it from `transformers.activations`. A process whose sys.path holds a checkout's root
would find the folder first: `python -c` / `python -m` put the working directory there, and Ray puts the
driver's working directory on every worker's sys.path (`ray/_private/worker.py`, `_py_driver_sys_path`, inserted
at position 0 when the worker runs its first task). From the checkout root, every Ray worker then failed with
`ImportError: cannot import name 'CUDAProperties' from 'kernels'`.

`install()` puts one finder first on `sys.meta_path`: for those two names only, it searches sys.path without the
entries that are a raysft checkout (an entry holding both `pipeline/ARCHITECTURE.md` and
`kernels/fused_linear_cross_entropy.py`), so the installed package wins wherever the process was started. When no
other entry has the name it answers nothing and the normal search goes on (as before: transformers then sees no
`kernels` distribution). Every other import, and a user's own folders on sys.path, are untouched.

Where it is installed (ARCHITECTURE.md, "Imports"): by `raysft.pipeline`'s `__init__` in any process that imports
raysft (the driver, and every Ray worker that runs raysft code, before that code imports transformers), and as
the `worker_process_setup_hook` of every Ray instance raysft starts or joins (`ray_runtime.py`), so a worker
has it from its first line. It imports only the standard library and never raises.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator
from functools import lru_cache

GUARDED = frozenset({"kernels", "pipeline"})
HOOK = "raysft.pipeline.import_guard.install"  # Ray's worker_process_setup_hook, by module path


@lru_cache(maxsize=64)
def is_checkout(entry: str) -> bool:
    """True when the sys.path entry is a raysft source tree (its root holds raysft's two source folders)."""
    root = entry or os.curdir
    return os.path.isfile(os.path.join(root, "pipeline", "ARCHITECTURE.md")) and os.path.isfile(
        os.path.join(root, "kernels", "fused_linear_cross_entropy.py")
    )


class CheckoutBlindFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level `kernels` / `pipeline` on sys.path with raysft checkouts left out."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in GUARDED:
            return None
        entries = [e for e in sys.path if isinstance(e, str) and not is_checkout(os.path.abspath(e or os.curdir))]
        if len(entries) == len(sys.path):
            return None  # no checkout on the path: the normal search is the same
        return importlib.machinery.PathFinder.find_spec(name, entries, target)


def install() -> None:
    """Put the finder first on sys.meta_path (once per process); drop a checkout module imported before it."""
    try:
        if not any(isinstance(f, CheckoutBlindFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, CheckoutBlindFinder())
        for name in GUARDED:
            module = sys.modules.get(name)
            origin = getattr(getattr(module, "__spec__", None), "origin", None) or ""
            if origin and is_checkout(os.path.dirname(os.path.dirname(os.path.abspath(origin)))):
                del sys.modules[name]  # a checkout folder imported under the bare name: found again, correctly
    except Exception:  # noqa: BLE001 - a guard must never stop a process (a Ray worker exits on a hook error)
        pass


@contextlib.contextmanager
def hidden(name: str, *, even_if_imported: bool = False) -> Iterator[None]:
    """For the block, the top-level module `name` looks absent (`import` raises ImportError and
    `importlib.util.find_spec` answers None), so a library that imports it only if installed skips it; afterwards it
    is importable again. A module already imported is left as it is, unless `even_if_imported`: then it is hidden
    for the block too and put back after it."""
    if name in sys.modules and not even_if_imported:
        yield
        return
    saved = sys.modules.get(name)
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            if saved is None:
                del sys.modules[name]
            else:
                sys.modules[name] = saved
