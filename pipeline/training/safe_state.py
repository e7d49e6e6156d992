"""State trees as safetensors + JSON: the only way raysft writes and reads optimizer state. No pickle, ever.

A tree is nested dicts (str or int keys), lists and tuples whose leaves are tensors, numbers, strings,
booleans or None (what torch optimizers, LR schedulers and DeepSpeed's ZeRO optimizers hold). It is
stored as two files: `STEM.safetensors` with every tensor under its path in the tree, and `STEM.json`
with the tree's shape and plain values. Reading parses only those two formats, so a file planted in
a run folder (a pickle, say) is refused with one sentence and never executed.

>>> import tempfile, torch
>>> d = tempfile.mkdtemp()
>>> files = save_tree({"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"betas": (0.9, 0.99)}]}, d + "/opt")
>>> load_tree(d + "/opt")["groups"][0]["betas"]
(0.9, 0.99)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raysft.pipeline.errors import CheckpointError


def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor], drop: frozenset[str]) -> Any:
    if isinstance(node, torch.Tensor):
        key = path or "."
        tensors[key] = node.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if node is None or isinstance(node, (bool, int, float, str)):
        # An IntEnum (DeepSpeed's ZeroStageEnum) is stored as its plain int.
        plain = (
            node
            if node is None or isinstance(node, bool)
            else next(t for t in (int, float, str) if isinstance(node, t))(node)
        )
        return {"v": plain}
    if isinstance(node, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors, drop) for i, v in enumerate(node)]
        return {"tuple" if isinstance(node, tuple) else "list": items}
    if isinstance(node, dict):
        items = []
        for k, v in node.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state key {k!r} at {path or '/'} is not a str or int")
            if isinstance(k, str) and k in drop:
                continue
            items.append([k, _encode(v, f"{path}/{k}", tensors, drop)])
        return {"dict": items}
    raise TypeError(f"state value of type {type(node).__name__} at {path or '/'} cannot be stored without pickle")


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{where} is not a raysft state file (bad node {str(node)[:60]}).")
    ((kind, value),) = node.items()
    if kind == "v":
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise CheckpointError(f"{where} holds a value raysft does not store ({type(value).__name__}).")
        return value
    if kind == "tensor":
        if value not in tensors:
            raise CheckpointError(f"{where} names tensor {value!r}, which its .safetensors file lacks.")
        return tensors[value]
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors, where) for v in value]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(v, tensors, where) for k, v in value}
    raise CheckpointError(f"{where} is not a raysft state file (unknown node kind {kind!r}).")


def save_tree(tree: Any, stem: str | os.PathLike, drop: frozenset[str] = frozenset()) -> list[Path]:
    """Write `tree` as STEM.safetensors + STEM.json; dict entries named in `drop` are left out. Returns both paths."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, "", tensors, drop)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    st, js = (
        stem.with_name(stem.name + ".safetensors"),
        stem.with_name(stem.name + ".json"),
    )
    save_file(tensors, str(st))
    js.write_text(json.dumps({"format": "raysft-state-1", "tree": skeleton}))
    return [st, js]


def load_tree(stem: str | os.PathLike) -> Any:
    """Read a tree written by `save_tree`; anything that is not safetensors + JSON is refused in one sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    st, js = (
        stem.with_name(stem.name + ".safetensors"),
        stem.with_name(stem.name + ".json"),
    )
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{st} is not a readable safetensors file ({(str(exc).splitlines() or [type(exc).__name__])[0]}); "
            "raysft never unpickles checkpoint files, so it refuses this one."
        ) from None
    try:
        doc = json.loads(js.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{js} is not readable JSON; raysft never unpickles checkpoint files, so it refuses this one."
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != "raysft-state-1":
        raise CheckpointError(f"{js} is not a raysft state file (no 'format': 'raysft-state-1').")
    return _decode(doc["tree"], tensors, str(js))
