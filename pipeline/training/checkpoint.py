"""Checkpoints: trainable weights, optimizer, scheduler, RNG, data position and ledger; safetensors, JSON, text only.

Layout of one checkpoint folder (every rank writes its part; Ray merges them into one folder):
    module.safetensors       the trainable (LoRA) parameters, full (gathered under ZeRO-3), by parameter name
    optim/rank{R}.safetensors + optim/rank{R}.json
                             rank R's optimizer state (its ZeRO partition), LR scheduler and engine counters
                             (training/safe_state.py: tensors in safetensors, the rest in JSON)
    adapter/                 the PEFT adapter (safetensors), loadable on its own
    optim/rank{R}.fragments.safetensors + .json
                             elastic runs (scaling.num_workers [min, max]) under ZeRO-1/2: rank R's pieces of each
                             trainable parameter's fp32 master and optimizer moments, by parameter name and offset,
                             so a resumed run re-partitions them over another worker count (`load_engine_state`,
                             training/engine.py)
    rng/rank{R}.json         Python, NumPy and torch RNG states of rank R
    samples.jsonl            the ledger up to this step
    config.yaml              the resolved config
    state.json               data position, world size
    manifest/rank{R}.json    size and SHA-256 of every file rank R wrote (written last)
A checkpoint counts only when the manifests of all ranks are present and every file matches them
(`problem`); anything else in the folder makes it invalid too. DeepSpeed's own save_checkpoint /
load_checkpoint are not used: they pickle (torch.load(weights_only=False)). Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysft.pipeline.errors import CheckpointError
from raysft.pipeline.models.load import save_adapter
from raysft.pipeline.run_folder import ADAPTER_DIR, LEDGER_FILE, RESOLVED_CONFIG
from raysft.pipeline.training import collectives
from raysft.pipeline.training.engine import (
    LIVE_ONLY,
    engine_state,
    fragments,
    load_partition,
    load_repartitioned,
    load_trainable,
    partitioned,
    restore_counters,
    trainable_state_dict,
)
from raysft.pipeline.training.safe_state import load_tree, save_tree

STATE_FILE = "state.json"
MODULE_FILE = "module.safetensors"
MANIFEST_DIR = "manifest"
# Written by Ray itself next to a checkpoint's files (Checkpoint.set_metadata); JSON, never read by raysft.
RAY_FILES = frozenset({".metadata.json"})
SPACE_MARGIN_BYTES = 4 << 20  # leave this much free after a checkpoint (metadata, Ray's snapshot)


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """This rank's RNG states as JSON-safe values (no pickle): Python, NumPy, torch CPU, and its own device.

    Only the generator of the rank's own accelerator is saved (not every visible GPU by index), so a
    restart on a node with fewer GPUs, or on another GPU index, restores this rank's stream exactly.
    """
    np_state = np.random.get_state()
    state = {
        "python": [
            random.getstate()[0],
            list(random.getstate()[1]),
            random.getstate()[2],
        ],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state().tolist(),
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cpu":
        state["device"] = {"type": dev.type, "state": _device_module(dev).get_rng_state(dev).tolist()}
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore `rng_state`; the saved device stream goes to this rank's device, whatever its index."""
    v, inner, gauss = state["python"]
    random.setstate((v, tuple(inner), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    dev = torch.device(device) if device is not None else None
    saved = state.get("device")
    if saved is not None and dev is not None and dev.type == saved["type"]:
        _device_module(dev).set_rng_state(torch.tensor(saved["state"], dtype=torch.uint8), dev)


def _device_module(dev: torch.device):
    """torch.cuda (or the module of another accelerator type): get_rng_state / set_rng_state per device."""
    return getattr(torch, dev.type)


# ---------------------------------------------------------------- engine state in the folder


def load_engine_state(engine, directory: Path, rank: int) -> None:
    """Restore trainable weights, optimizer (incl. fp32 master partitions), scheduler and counters: this rank's own
    partition at the saved world size, else re-partitioned from every saved rank's pieces (training/engine.py)."""
    load_trainable(engine, _load_module_file(directory / MODULE_FILE), directory)
    saved_world = int(json.loads((directory / STATE_FILE).read_text())["world_size"])
    if saved_world != collectives.world_size():
        tree = load_tree(directory / "optim" / "rank0")
        load_repartitioned(engine, tree, _saved_fragments(engine, directory, saved_world))
    else:
        tree = load_tree(directory / "optim" / f"rank{rank}")
        load_partition(engine, tree)
    restore_counters(engine, tree)


def _saved_fragments(engine, directory: Path, saved_world: int) -> list[dict[str, Any]] | None:
    """Every saved rank's optimizer fragments, in rank order (None when the optimizer is not partitioned: each rank
    holds the whole state); one sentence when the checkpoint was written without them (not an elastic run)."""
    if not partitioned(engine):
        return None
    stems = [directory / "optim" / f"rank{r}.fragments" for r in range(saved_world)]
    if not all(stem.with_name(stem.name + ".json").is_file() for stem in stems):
        raise CheckpointError(
            f"Checkpoint {directory} was written by {saved_world} workers without the re-partitionable optimizer "
            "state (it was not an elastic run), so it can only resume at that many workers; set "
            f"scaling.num_workers to {saved_world}."
        )
    return [load_tree(stem) for stem in stems]


def _load_module_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        raise CheckpointError(
            f"{path} is not a readable safetensors file; raysft never unpickles checkpoint files, "
            "so it refuses this one."
        ) from None


# ---------------------------------------------------------------- save, verify, load


def save(
    engine,
    directory: str | Path,
    *,
    rank: int,
    state: dict[str, Any],
    ledger_path: Path | None,
    config_yaml: str,
    storage: str | Path | None = None,
    device: torch.device | str | None = None,
    resizable: bool = False,
) -> Path:
    """Write, seal (manifest) and verify this rank's part of a checkpoint in `directory`; every rank calls it.

    `resizable` (an elastic run): also write this rank's optimizer fragments, so the run can resume at another
    world size.

    With `storage` (a local folder the checkpoint is uploaded to), fail in one sentence on every rank
    when it has less free space than the whole checkpoint (all ranks) needs, before anything is uploaded.
    """
    directory = Path(directory)
    state = {**state, "world_size": collectives.world_size()}
    written: list[Path] = []
    weights = trainable_state_dict(engine.module)
    try:
        written += save_tree(engine_state(engine), directory / "optim" / f"rank{rank}", drop=LIVE_ONLY)
        pieces = fragments(engine) if resizable else None
        if pieces is not None:
            written += save_tree(pieces, directory / "optim" / f"rank{rank}.fragments")
        rng = directory / "rng" / f"rank{rank}.json"
        rng.parent.mkdir(parents=True, exist_ok=True)
        rng.write_text(json.dumps(rng_state(device)))
        written.append(rng)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(weights, str(directory / MODULE_FILE))
            written.append(directory / MODULE_FILE)
            save_adapter(engine.module, directory / ADAPTER_DIR, state_dict=weights)
            written += [p for p in (directory / ADAPTER_DIR).rglob("*") if p.is_file()]
            if ledger_path is not None and ledger_path.is_file():
                shutil.copyfile(ledger_path, directory / LEDGER_FILE)
                written.append(directory / LEDGER_FILE)
            (directory / RESOLVED_CONFIG).write_text(config_yaml)
            (directory / STATE_FILE).write_text(json.dumps(state))
            written += [directory / RESOLVED_CONFIG, directory / STATE_FILE]
        manifest = write_manifest(directory, rank, written)
    except OSError as exc:
        raise CheckpointError(
            f"Could not write checkpoint step {state['step']} to {directory} ({exc.strerror or exc})."
        ) from None
    bad = _check_files(directory, manifest["files"])
    if bad:
        raise CheckpointError(f"Checkpoint step {state['step']} failed verification right after writing: {bad}.")
    need = (
        sum(f["size"] for f in manifest["files"].values())
        + (directory / MANIFEST_DIR / f"rank{rank}.json").stat().st_size
    )
    _check_space(storage, need, state["step"], collectives.is_distributed())
    return directory


def _check_space(storage: str | Path | None, need: int, step: int, distributed: bool) -> None:
    """Every rank raises the same sentence when the storage cannot take the whole checkpoint.

    One collective (training/collectives.py: on the group's device) gathers every rank's (bytes, free space)."""
    free = -1.0
    if storage is not None and Path(storage).exists():
        free = float(shutil.disk_usage(storage).free)
    ranks = collectives.gather_to_host([float(need), free]) if distributed else [[float(need), free]]
    total = sum(r[0] for r in ranks)
    known = [r[1] for r in ranks if r[1] >= 0]
    if any(f < total + SPACE_MARGIN_BYTES for f in known):
        raise CheckpointError(
            f"Not enough space in {storage} for checkpoint step {step}: {min(known) / 2**20:.1f} MiB free, "
            f"{(total + SPACE_MARGIN_BYTES) / 2**20:.1f} MiB needed; free space and rerun the same command "
            "to resume from the last complete checkpoint."
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, rank: int, files: list[Path]) -> dict[str, Any]:
    """manifest/rank{R}.json: {"rank", "files": {relative path: {"size", "sha256"}}}; written after every file."""
    entries = {
        p.relative_to(directory).as_posix(): {
            "size": p.stat().st_size,
            "sha256": _sha256(p),
        }
        for p in files
    }
    manifest = {"rank": rank, "files": entries}
    path = directory / MANIFEST_DIR / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, sort_keys=True))
    return manifest


def _check_files(directory: Path, files: dict[str, dict]) -> str | None:
    for rel, want in files.items():
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, its manifest says {want['size']}"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def problem(directory: str | Path) -> str | None:
    """None when `directory` is a complete checkpoint; else what is wrong with it, as a short phrase."""
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        world = int(state["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is missing or unreadable"
    listed: set[str] = set()
    for r in range(world):
        mpath = directory / MANIFEST_DIR / f"rank{r}.json"
        try:
            files = json.loads(mpath.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"the manifest of rank {r} is missing or unreadable"
        bad = _check_files(directory, files)
        if bad:
            return bad
        listed |= set(files) | {f"{MANIFEST_DIR}/rank{r}.json"}
    extra = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(directory).as_posix() not in listed | RAY_FILES
    )
    if extra:
        return f"it holds {extra[0]}, a file no rank wrote"
    return None


def load(engine, directory: str | Path, *, rank: int, device: torch.device | str | None = None) -> dict[str, Any]:
    """Restore engine state and this rank's RNG from a verified checkpoint; return the data position."""
    directory = Path(directory)
    why = problem(directory)
    if why is not None:
        raise CheckpointError(f"Checkpoint {directory} is not complete ({why}); refusing to resume from it.")
    load_engine_state(engine, directory, rank)
    rng = directory / "rng" / f"rank{rank}.json"
    if rng.is_file():
        set_rng_state(json.loads(rng.read_text()), device)
    return json.loads((directory / STATE_FILE).read_text())


def step_of(directory: str | Path) -> int:
    """The step a checkpoint folder was written at, from its name (checkpoint_000004 -> 4); -1 when not one."""
    name = Path(str(directory).rstrip("/")).name
    prefix, _, digits = name.partition("_")
    return int(digits) if prefix == "checkpoint" and digits.isdigit() else -1


def resume_checkpoint(registered, verified: str | None, rank: int):
    """The checkpoint to resume from: Ray Train's latest registered one when it is complete and not older
    than `verified` (the newest complete one the driver found in storage before the run), else `verified`."""
    from ray.train import Checkpoint

    if registered is not None:
        local = Path(registered.path)
        why = problem(local) if local.is_dir() else None  # remote storage: `load` verifies after download
        if why is None and step_of(local) >= step_of(verified or ""):
            return registered
        if why is not None and rank == 0:
            print(f"[raysft] skipping checkpoint {local.name}: {why}.", flush=True)
    return Checkpoint(verified) if verified else None
