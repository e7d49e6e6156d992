"""Run identity: what defines a run, recorded in its folder, and what a rerun of the same run.name may do.

`run.json` in the run folder holds the values that define the run (`identity`) and its planned
length. Rerunning the same run.name (decided on the driver, before any worker starts):
    same identity and length              resume from the newest complete checkpoint
    same identity, more steps/epochs      extend: resume, and plan the LR schedule over the new total
    anything else                         refused in one sentence naming the keys that differ
`run.resume` (auto | never | must) narrows that. A refused run changes nothing in the folder;
an accepted one records run.json and config.yaml, and sets aside what would block resuming (a
truncated checkpoint_manager_snapshot.json, incomplete checkpoints), each said in one sentence.
The same rule holds for a run folder on an object store, read and written through storage.py; there
Ray Train resumes from its own snapshot in the bucket, and checkpoint completeness is checked by
`checkpoint.load` after download, so no checkpoint is picked or set aside here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysft.pipeline import storage
from raysft.pipeline.config import Config, get_dotted
from raysft.pipeline.errors import CheckpointError
from raysft.pipeline.run_folder import IDENTITY_FILE, RAY_SNAPSHOT, RESOLVED_CONFIG
from raysft.pipeline.storage import StorageOptions
from raysft.pipeline.training import checkpoint as ckpt_io

# Config keys that define a run, by family: the prepared data and the global batch are added as values.
IDENTITY_KEYS: tuple[str, ...] = (
    "model.name_or_path",
    "model.gguf_file",
    "model.quantization",
    "model.dtype",  # base model
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.use_rslora",
    "lora.use_dora",
    "lora.bias",  # LoRA shape and targets
    "train.lr",
    "train.weight_decay",
    "train.scheduler",
    "train.warmup_ratio",
    "train.warmup_steps",
    "train.max_grad_norm",  # optimizer and schedule
    "train.seed",
    "train.deepspeed.stage",
    "scaling.num_workers",  # how optimizer state is partitioned in checkpoints (fixed-size runs only)
)


def identity(cfg: Config, data_key: str) -> dict[str, Any]:
    """The values that define a run of `cfg` on the prepared data `data_key`."""
    data = cfg.to_dict()
    ident: dict[str, Any] = {"data.prepared_key": data_key}
    elastic = cfg.scaling.elastic  # its checkpoints re-partition to any worker count: the count is not identity
    ident.update({k: get_dotted(data, k) for k in IDENTITY_KEYS if not (elastic and k == "scaling.num_workers")})
    if elastic:
        ident["scaling.elastic"] = True
    ident["train.global_batch"] = cfg.rows_per_step()
    return ident


def fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Decision:
    """What a (re)run of a run.name does; `apply` makes it so in the folder."""

    run_dir: Path | str  # a URI string for a run folder on an object store
    mode: str  # "new" | "resume" | "extend"
    record: dict[str, Any]
    resume_from: str | None = None  # the newest complete checkpoint folder
    set_aside: list[Path] = field(default_factory=list)  # moved out of the way, with a note each
    notes: list[str] = field(default_factory=list)


def _total(max_steps: int | None, epochs: int, steps_per_epoch: int | None) -> int | None:
    if max_steps is not None:
        return max_steps
    return epochs * steps_per_epoch if steps_per_epoch is not None else None


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def decide(
    cfg: Config,
    data_key: str,
    run_dir: Path | str,
    steps_per_epoch: int | None = None,
    options: StorageOptions | None = None,
) -> Decision:
    """Check `run_dir` (a folder or an object-store URI) against `cfg` and run.resume; raise CheckpointError (one
    sentence) or say what happens."""
    ident = identity(cfg, data_key)
    t = cfg.train
    record = {
        "fingerprint": fingerprint(ident),
        "identity": ident,
        "max_steps": t.max_steps,
        "epochs": t.epochs,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": _total(t.max_steps, t.epochs, steps_per_epoch),
        "attention": cfg.model.attn_implementation,  # resolved by preflight: what this run's workers use
    }
    name, mode = cfg.run.name, cfg.run.resume
    remote = storage.is_remote(run_dir)
    path = storage.join(run_dir, IDENTITY_FILE)
    has_identity = storage.exists(path, options)
    checkpoints = (
        []
        if remote  # Ray Train resumes from its snapshot in the bucket (module docstring)
        else sorted(
            (p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and ckpt_io.step_of(p) >= 0),
            key=ckpt_io.step_of,
            reverse=True,
        )
    )
    if not has_identity and not checkpoints:
        if mode == "must":
            raise CheckpointError(f"run.resume is 'must' but {run_dir} holds no run named {name} to resume.")
        return Decision(run_dir, "new", record)
    if mode == "never":
        raise CheckpointError(
            f"{run_dir} already holds a run named {name} and run.resume is 'never'; "
            "choose a new run.name, or set run.resume to auto to continue it."
        )
    if not has_identity:
        raise CheckpointError(
            f"{run_dir} holds checkpoints but no {IDENTITY_FILE}, so raysft cannot tell which run "
            "they belong to; choose a new run.name."
        )
    try:
        old = json.loads(storage.read_bytes(path, options))
        old_ident, old_spe = dict(old["identity"]), old.get("steps_per_epoch")
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not readable JSON with an 'identity'; choose a new run.name.") from None
    differ = [k for k in sorted(set(ident) | set(old_ident)) if ident.get(k) != old_ident.get(k)]
    if differ:
        shown = ", ".join(f"{k} {_show(old_ident.get(k))} -> {_show(ident.get(k))}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise CheckpointError(
            f"Run {name} in {run_dir} was started with other settings ({shown}{more}); "
            "rerun it with the same settings to resume, or choose a new run.name."
        )
    spe = steps_per_epoch if steps_per_epoch is not None else old_spe
    new_total, old_total = _total(t.max_steps, t.epochs, spe), old.get("total_steps")
    record["steps_per_epoch"], record["total_steps"] = spe, new_total
    decision = Decision(run_dir, "resume", record)
    if new_total is not None and old_total is not None and new_total != old_total:
        if new_total < old_total:
            raise CheckpointError(
                f"Run {name} was planned for {old_total} steps; train.max_steps/train.epochs now give "
                f"{new_total}, and a run can only be extended: use the old length or a new run.name."
            )
        decision.mode = "extend"
        decision.notes.append(
            f"extending run {name} from {old_total} to {new_total} steps; the learning-rate "
            f"schedule is re-planned over {new_total} steps from the resumed step."
        )
    for ckpt in checkpoints:
        why = ckpt_io.problem(ckpt)
        if why is None:
            decision.resume_from = str(ckpt)
            break
        decision.set_aside.append(ckpt)
        decision.notes.append(f"skipping checkpoint {ckpt.name}: {why}.")
    if remote:
        return decision
    if mode == "must" and decision.resume_from is None:
        raise CheckpointError(f"run.resume is 'must' but {run_dir} has no complete checkpoint to resume from.")
    snapshot = Path(run_dir) / RAY_SNAPSHOT
    if snapshot.exists() and not _snapshot_usable(snapshot, decision.resume_from):
        decision.set_aside.append(snapshot)
        decision.notes.append(
            f"Ray Train's {RAY_SNAPSHOT} is truncated or names an incomplete checkpoint; "
            f"resuming from {Path(decision.resume_from).name if decision.resume_from else 'the start'} instead."
        )
    return decision


def _snapshot_usable(snapshot: Path, resume_from: str | None) -> bool:
    """Ray restores from its snapshot's latest checkpoint: usable when it parses and that one is complete."""
    try:
        data = json.loads(snapshot.read_text())
        latest = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, AttributeError):
        return False
    if latest is None:
        return True
    return resume_from is not None and ckpt_io.step_of(latest) <= ckpt_io.step_of(resume_from)


def apply(decision: Decision, config_yaml: str, options: StorageOptions | None = None) -> None:
    """Record the run's identity and resolved config (a local file through a temp sibling, an object in one PUT);
    move blocking files aside (never delete them)."""
    run_dir = decision.run_dir
    for note in decision.notes:
        print(f"[raysft] {note}", flush=True)
    for p in decision.set_aside:
        target = p.with_name(f"{p.name}.set-aside-{os.getpid()}")
        os.replace(p, target)
    record = json.dumps(decision.record, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(storage.join(run_dir, IDENTITY_FILE), record.encode(), options)
    storage.write_bytes(storage.join(run_dir, RESOLVED_CONFIG), config_yaml.encode(), options)
