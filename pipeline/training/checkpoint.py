"""Checkpoints: DeepSpeed engine state (LoRA weights, optimizer, scheduler) + RNG + data position + ledger.

Layout of one checkpoint folder (every rank writes its part; Ray merges them into one folder):
    ds/                      DeepSpeed `save_checkpoint` (trainable params only: frozen base excluded)
    adapter/                 the PEFT adapter (safetensors), loadable on its own
    rng/rank{R}.json         Python, NumPy and torch RNG states of rank R
    samples.jsonl            the ledger up to this step
    config.yaml              the resolved config
    state.json               data position (written last: a folder without it is incomplete)
DeepSpeed writes its optimizer / module states with torch.save (pickle); raysft reads them back only
from its own run storage. Model tensors a user gets (adapter/, merged/) are safetensors.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysft.pipeline.models.load import ADAPTER_DIR, RESOLVED_CONFIG, save_adapter
from raysft.pipeline.training.ledger import LEDGER_FILE

TAG = "ds"
STATE_FILE = "state.json"


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """This rank's RNG states as JSON-safe values (no pickle): Python, NumPy, torch CPU, and its own device.

    Only the generator of the rank's own accelerator is saved (not every visible GPU by index), so a
    restart on a node with fewer GPUs, or on another GPU index, restores this rank's stream exactly.
    """
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
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


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered under ZeRO-3) copies of the trainable parameters; call on every rank."""
    import deepspeed

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in params}


def _trainable_module_state(engine) -> None:
    """Make DeepSpeed's module state the trainable parameters only (on this engine instance).

    DeepSpeed builds `module.state_dict()` of the whole model and drops frozen entries afterwards:
    that serialises the entire 4-bit base each time, and under ZeRO-3 bitsandbytes cannot even
    repack its partitioned (empty) weights. The LoRA tensors are all a checkpoint needs; under
    ZeRO-3 their values live in DeepSpeed's partitioned optimizer files.
    """
    if getattr(engine, "_raysft_trainable_state", False):
        return

    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        return {prefix + n: (p if keep_vars else p.detach()) for n, p in engine.module.named_parameters() if p.requires_grad}

    engine.module_state_dict = module_state_dict
    engine._raysft_trainable_state = True


def save(engine, directory: str | Path, *, rank: int, state: dict[str, Any], ledger_path: Path | None,
         config_yaml: str, device: torch.device | str | None = None) -> Path:
    """Write this rank's part of a checkpoint into `directory` (every rank calls it)."""
    directory = Path(directory)
    _trainable_module_state(engine)
    engine.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=True)
    adapter = trainable_state_dict(engine.module)
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    (directory / "rng" / f"rank{rank}.json").write_text(json.dumps(rng_state(device)))
    if rank == 0:
        save_adapter(engine.module, directory / ADAPTER_DIR, state_dict=adapter)
        if ledger_path is not None and ledger_path.is_file():
            shutil.copyfile(ledger_path, directory / LEDGER_FILE)
        (directory / RESOLVED_CONFIG).write_text(config_yaml)
        (directory / STATE_FILE).write_text(json.dumps(state))
    return directory


def load(engine, directory: str | Path, *, rank: int, device: torch.device | str | None = None) -> dict[str, Any]:
    """Restore engine (LoRA weights, optimizer, scheduler) and this rank's RNG; return the data position."""
    directory = Path(directory)
    engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=False,
                           load_optimizer_states=True, load_lr_scheduler_states=True)
    rng = directory / "rng" / f"rank{rank}.json"
    if rng.is_file():
        set_rng_state(json.loads(rng.read_text()), device)
    return json.loads((directory / STATE_FILE).read_text())
