"""DeepSpeed in one place: its config, the import workaround, the engine and the step adapter over it, and the
ZeRO state as plain trees (this rank's partition, world-size-free pieces of it, re-partitioning them).

`training/checkpoint.py` decides where these trees live in a checkpoint folder and checks the files; this module
knows what they hold and how they go in and out of a DeepSpeed engine. `deepspeed` is imported inside functions
only (heavy, and its first import goes through `import_deepspeed`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raysft.pipeline import import_guard
from raysft.pipeline.config import Config
from raysft.pipeline.errors import CheckpointError, ConfigError
from raysft.pipeline.training import collectives

# Optimizer-state entries that are objects, not data; restored from the live optimizer (DeepSpeed's
# static loss scaler with bf16/fp32, and the slice maps only universal checkpoints use).
LIVE_ONLY = frozenset({"loss_scaler", "param_slice_mappings", "universal_checkpoint_info"})


# ---------------------------------------------------------------- config


def read_deepspeed_json(path: str | os.PathLike) -> dict:
    """The user's DeepSpeed config (train.deepspeed.config): readable JSON holding an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed.config {path} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"train.deepspeed.config {path} holds a JSON {type(data).__name__}, not an object of DeepSpeed settings."
        )
    return data


def check_precision(cfg: Config, user_json: dict | None) -> None:
    """fp32 gradient accumulation at every ZeRO stage: DeepSpeed's stage 0 accumulates in the model's dtype
    (a bf16 model with fp32 accumulation is refused by DeepSpeed there), so stage 0 with bf16 is refused here."""
    zero = (user_json or {}).get("zero_optimization") or {"stage": cfg.train.deepspeed.stage}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else cfg.train.deepspeed.stage
    if stage == 0 and cfg.model.dtype == "bfloat16":
        where = "train.deepspeed.config's zero_optimization.stage" if user_json else "train.deepspeed.stage"
        raise ConfigError(
            f"{where} 0 with model.dtype bfloat16 would accumulate gradients in bf16 (DeepSpeed accumulates in "
            "fp32 only at ZeRO stages 1-3); use stage 1 or higher, or model.dtype float32."
        )


def deepspeed_config(
    cfg: Config, world_size: int, user_json: dict[str, Any] | None = None, grad_accum: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON: from the config, or the user's JSON with raysft's batch/precision keys enforced.

    `grad_accum`: the micro-batches per worker at this world size (default train.grad_accum)."""
    t = cfg.train
    accum = grad_accum if grad_accum is not None else t.grad_accum
    ds: dict[str, Any] = dict(user_json or {})
    zero = dict(ds.get("zero_optimization") or {"stage": t.deepspeed.stage})
    if user_json is None:
        if t.deepspeed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if t.deepspeed.offload_params and t.deepspeed.stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    ds.update(
        {
            # raysft's step logic owns these: the data order and loss normalisation depend on them.
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "train_batch_size": t.micro_batch_size * accum * world_size,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch AdamW over the LoRA parameters
            "zero_force_ds_cpu_optimizer": False,
        }
    )
    ds.setdefault("gradient_clipping", t.max_grad_norm)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}  # bf16, never fp16, with a 4-bit base
    if zero.get("stage", 0) >= 1:
        # Accumulate the micro-batches' gradients in fp32, not in the bf16 of the model (DeepSpeed's
        # ZeRO optimizers take the dtype from here; stage 0 only supports the model's own dtype).
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
    ds.pop("fp16", None)
    ds.pop("optimizer", None)  # the optimizer and schedule come from train.* (so resume restores them)
    ds.pop("scheduler", None)
    return ds


# ---------------------------------------------------------------- the engine


def import_deepspeed():
    """`import deepspeed` without the mlflow import its autotuner makes whenever mlflow is installed (2-7 s of
    CPU per worker process on a small machine); raysft never runs DeepSpeed's autotuner. The guard lasts for
    this one import: mlflow stays importable afterwards (rank 0's tracking), and one already imported is used."""
    with import_guard.hidden("mlflow"):  # `import mlflow` raises ImportError, which DeepSpeed's autotuner expects
        import deepspeed  # heavy: deferred to the worker that trains
    return deepspeed


def initialize(
    cfg: Config,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    *,
    world_size: int,
    grad_accum: int,
    device: torch.device,
    user_json: dict[str, Any] | None = None,
):
    """The DeepSpeed engine over `model`, its optimizer and schedule (the process group already joined)."""
    deepspeed = import_deepspeed()
    if device.type == "cpu":
        # The shared-memory all-reduce op (JIT-compiled, ~2 min) only serves inference collectives;
        # training over gloo does not use it, so do not build it.
        import deepspeed.ops  # heavy: DeepSpeed's op registry

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, user_json, grad_accum=grad_accum),
        dist_init_required=False,
    )
    return engine


class DeepSpeedStepEngine:
    """StepEngine over a DeepSpeed engine: the engine averages gradients over ranks and accumulation."""

    def __init__(self, engine):
        self.engine = engine

    def forward_model(self):
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already divided by the step's N

    def micro_step(self) -> None:
        self.engine.step()  # DeepSpeed updates only at the accumulation boundary

    def finish_step(self) -> torch.Tensor | float | None:
        return self.engine.get_global_grad_norm()  # a tensor stays on the device until the step's host read

    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])


def base_weight_residency(model: torch.nn.Module) -> dict[str, int]:
    """Elements of the frozen base weights this rank holds vs their full size (ZeRO-3 partitions them)."""
    counts = {"base_numel_local": 0, "base_numel_full": 0, "base4bit_numel_local": 0, "base4bit_numel_full": 0}
    for p in model.parameters():
        if p.requires_grad:
            continue
        ds_tensor = getattr(p, "ds_tensor", None)
        # Under ZeRO-3 a released parameter's .data is empty and its shard is ds_tensor; a
        # "persistent" (small) one keeps its full .data as well, so it counts fully here.
        local = p.data.numel() + (ds_tensor.numel() if ds_tensor is not None else 0)
        full = getattr(p, "ds_numel", p.numel())
        kinds = ["base", "base4bit"] if type(p).__name__ == "Params4bit" else ["base"]
        for kind in kinds:
            counts[f"{kind}_numel_local"] += int(local)
            counts[f"{kind}_numel_full"] += int(full)
    return counts


# ---------------------------------------------------------------- ZeRO state as trees


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered under ZeRO-3) copies of the trainable parameters; call on every rank."""
    import deepspeed  # heavy: loaded by the worker that trains (import_deepspeed)

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in params}


def engine_state(engine) -> dict[str, Any]:
    """What DeepSpeed's save_checkpoint would keep for resuming, as a plain tree (this rank's partition)."""
    sched = engine.lr_scheduler
    return {
        "optimizer": engine.optimizer.state_dict(),
        "lr_scheduler": sched.state_dict() if sched is not None else None,
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
    }


def _lp_groups(zero_optimizer) -> list[list[torch.nn.Parameter]] | None:
    """The trainable parameters of each flat partition group of a partitioning DeepSpeed optimizer (ZeRO-1/2:
    bit16_groups, the bf16 optimizer: bf16_groups); None for a plain torch optimizer (every rank holds all)."""
    for name in ("bit16_groups", "bf16_groups"):
        groups = getattr(zero_optimizer, name, None)
        if groups is not None:
            return groups
    return None


def partitioned(engine) -> bool:
    """Whether the optimizer state is split over the ranks (ZeRO-1/2, the bf16 optimizer), so that resuming at
    another world size needs every saved rank's `fragments`."""
    return _lp_groups(engine.optimizer) is not None


def fragments(engine) -> dict[str, Any] | None:
    """This rank's pieces of the fp32 master weights and optimizer moments, by parameter name and offset into the
    flattened parameter: a layout that does not depend on the world size (None when nothing is partitioned)."""
    groups = _lp_groups(engine.optimizer)
    if groups is None:
        return None
    names = {id(p): n for n, p in engine.module.named_parameters() if p.requires_grad}
    inner = engine.optimizer.optimizer
    out: dict[str, Any] = {"step": [], "params": {}}
    for i, group in enumerate(groups):
        hp = inner.param_groups[i]["params"][0]
        step = inner.state.get(hp, {}).get("step")
        out["step"].append(float(step) if step is not None else None)
        for lp in group:
            m = getattr(lp, "_hp_mapping", None)
            if m is None:
                continue  # this rank holds no piece of it
            piece = {"start": int(m.lp_fragment_address.start), "fp32": m.hp_fragment}
            piece.update({k: m.get_optim_state_fragment(k) for k in m.get_optim_state_keys()})
            out["params"][names[id(lp)]] = piece
    return out


def load_trainable(engine, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy full trainable weights (by parameter name) into the engine's model, scattered again under ZeRO-3;
    `source` names the checkpoint in the one-sentence refusal of another LoRA shape."""
    import deepspeed  # heavy: loaded by the worker that trains (import_deepspeed)

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in params if n not in weights]
    if missing or len(weights) != len(params):
        raise CheckpointError(
            f"Checkpoint {source} holds weights for {len(weights)} trainable parameters, this model "
            f"has {len(params)} (first missing: {missing[0] if missing else 'none'}); it belongs to another LoRA shape."
        )
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
        for n, p in params:
            w = weights[n]
            if tuple(w.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"Checkpoint {source}: {n} has shape {tuple(w.shape)}, the model {tuple(p.shape)}."
                )
            p.data.copy_(w.to(p.dtype))


def load_partition(engine, tree: dict[str, Any]) -> None:
    """Restore this rank's own optimizer partition (`engine_state` of the same rank at the same world size)."""
    opt = tree["optimizer"]
    if hasattr(engine.optimizer, "loss_scaler"):
        opt["loss_scaler"] = engine.optimizer.loss_scaler
    if engine.zero_optimization():
        group = engine.optimizer.dp_process_group
        sd_list: list[Any] = [None] * collectives.world_size(group)
        sd_list[collectives.rank(group)] = opt
        engine.optimizer.load_state_dict(
            state_dict_list=sd_list,
            load_optimizer_states=True,
            load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
        )
    elif engine.bfloat16_enabled() or engine.fp16_enabled():
        engine.optimizer.load_state_dict(opt, load_optimizer_states=True)
    else:
        engine.optimizer.load_state_dict(opt)


def load_repartitioned(engine, tree: dict[str, Any], pieces: list[dict[str, Any]] | None) -> None:
    """Restore a checkpoint written at another world size into this engine's partition.

    `tree`: rank 0's `engine_state`; `pieces`: every saved rank's `fragments`, in rank order (None when the
    optimizer is not `partitioned`). ZeRO-1/2 (and the bf16 optimizer): each parameter's fp32 master and moments
    are assembled from all pieces and this rank keeps its own new piece of them; a plain optimizer holds the
    whole state on every rank, so rank 0's is loaded."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states  # heavy: DeepSpeed

    groups = _lp_groups(engine.optimizer)
    if groups is None:
        engine.optimizer.load_state_dict(tree["optimizer"])
        return
    assert pieces is not None, "a partitioned optimizer needs every saved rank's fragments"
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    names, sizes = {id(p): n for n, p in trainable}, {n: p.numel() for n, p in trainable}
    full: dict[str, dict[str, torch.Tensor]] = {}
    for part in pieces:
        for name, piece in part["params"].items():
            target = full.setdefault(name, {})
            for key, value in piece.items():
                if key == "start":
                    continue
                buf = target.setdefault(key, torch.zeros(sizes[name], dtype=torch.float32))
                buf[piece["start"] : piece["start"] + value.numel()] = value.float()
    inner = engine.optimizer.optimizer
    for i, group in enumerate(groups):
        keys: set[str] = set()
        for lp in group:
            m = getattr(lp, "_hp_mapping", None)
            if m is None:
                continue
            start, numel = int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel)
            values = full[names[id(lp)]]
            m.hp_fragment.data.copy_(values["fp32"][start : start + numel])
            dev = m.hp_fragment.device
            m.optim_fragment = {k: v[start : start + numel].to(dev).clone() for k, v in values.items() if k != "fp32"}
            keys |= set(m.optim_fragment)
        hp = inner.param_groups[i]["params"][0]
        step = pieces[0]["step"][i]
        if step is not None:
            inner.state[hp]["step"] = torch.tensor(step, dtype=torch.float32)
        map_to_flat_opt_states(hp, group, inner.state, sorted(keys))
    engine.optimizer._hp_optimizer_states_linked = True  # linked above; DeepSpeed would link empty state otherwise
    base = tree["optimizer"].get("base_optimizer_state")
    if isinstance(base, dict) and "param_groups" in base:
        for current, old in zip(inner.param_groups, base["param_groups"]):
            current.update({k: v for k, v in old.items() if k != "params"})


def restore_counters(engine, tree: dict[str, Any]) -> None:
    """LR scheduler and engine counters (the same on every rank)."""
    if engine.lr_scheduler is not None and tree["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(tree["lr_scheduler"])
    engine.global_steps, engine.global_samples = (
        tree["global_steps"],
        tree["global_samples"],
    )
    engine.skipped_steps = tree["skipped_steps"]
