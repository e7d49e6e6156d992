"""The per-worker training loop: QLoRA with DeepSpeed on packed rows. `run_worker` reads top to bottom.

It takes its distributed context (rank, world size, device, report/checkpoint, resume) from a
`WorkerContext` (training/context.py), so the same code runs under Ray Train
(`train_loop_per_worker`, whose `loop_config` comes from `trainer.build_trainer`) and under plain
torch.distributed (`training/torchrun_entry.py`). `loop_config` holds:
    config       Config.to_dict()
    train_index  the shard index of the packed train rows (ShardIndex.to_dict()): each worker streams its
                 steps' rows from the shards (training/reader.py); eval_index likewise or None (read whole)
    resume_from  the newest complete checkpoint the driver found in storage (trainer's run identity), or None
    run_dir      the run folder (a path or a URI) where rank 0 keeps metrics.jsonl, samples.jsonl, events.jsonl
                 and TensorBoard events (run_folder.py)
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysft.pipeline import storage
from raysft.pipeline.config import Config, accumulation
from raysft.pipeline.data.schema import REQUIRED_COLUMNS
from raysft.pipeline.data.shards import ShardIndex, read_all
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.models.load import build_model
from raysft.pipeline.run_folder import LEDGER_FILE, RunFolder, append_event
from raysft.pipeline.storage import StorageOptions
from raysft.pipeline.training import checkpoint as ckpt_io
from raysft.pipeline.training import collectives, generate_eval
from raysft.pipeline.training.context import WorkerContext
from raysft.pipeline.training.ledger import Ledger
from raysft.pipeline.training.metrics import MetricsLog
from raysft.pipeline.training.preemption import Notice, PreemptionWatch
from raysft.pipeline.training.ray_context import RayTrainContext
from raysft.pipeline.training.reader import reader_for
from raysft.pipeline.training.run_files import SyncedContext
from raysft.pipeline.training.step import (
    MicroBatch,
    collate_table,
    eval_loss_sum,
    make_optimizer,
    optimizer_step,
    trained_counts,
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


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(cfg: Config) -> str:
    """The attention a run uses: "auto" is flash_attention_2 (one varlen sequence per micro-batch: no dense
    block-causal mask) on GPUs when flash-attn is importable, else sdpa. An explicit flash_attention_2 without
    the package is refused before any worker starts: transformers would try a hub download instead."""
    impl = cfg.model.attn_implementation
    if impl == "auto":
        return "flash_attention_2" if cfg.scaling.use_gpu and flash_attn_importable() else "sdpa"
    if impl == "flash_attention_2" and not flash_attn_importable():
        raise ConfigError(
            "model.attn_implementation flash_attention_2 needs the flash-attn package, which is not importable "
            "here; install flash-attn (pip install flash-attn) or set model.attn_implementation: sdpa."
        )
    return impl


def layout_for(cfg: Config) -> str:
    """Flash attention takes one flat sequence with its sample boundaries; other attention, rows stacked."""
    return "flat" if cfg.model.attn_implementation.startswith("flash_attention") else "rows"


def _micro_batches(table, rows: np.ndarray, layout: str) -> list[MicroBatch]:
    """rows[k, m]: k micro-batches of m packed rows each."""
    return [collate_table(table, rows[k].tolist(), layout) for k in range(rows.shape[0])]


def _step_sources(table, rows: np.ndarray) -> list[int]:
    """Source ids of ALL rows of a step, in step order (for the ledger, on rank 0 only): Arrow, no Python rows."""
    import pyarrow.compute as pc

    taken = table.column("source_ids").take(rows.reshape(-1))
    return pc.list_flatten(taken).to_numpy(zero_copy_only=False).tolist()


@dataclass
class StepNumbers:
    """What the loop reads of a step on the host, summed over ranks, after the step's one host sync."""

    loss_sum: float
    tokens: float
    notices: float  # ranks holding a preemption notice
    grad_norm: float
    lr: float
    seconds: float
    notice: Notice | None  # this rank's own notice


def train_step(
    stepper,
    mbs: list[MicroBatch],
    n_global: int,
    *,
    world: int,
    kernels: bool,
    device: torch.device,
    pending: Callable[[], Notice | None],
) -> StepNumbers:
    """One optimizer step, its one all-reduce (loss sum, tokens, preemption notices) and one host read.

    `pending` (this rank's notice) is read after the backward passes, so a notice that arrives during the
    step is agreed on at its end; the grad norm comes back in the same device-to-host copy
    (ARCHITECTURE.md, "Collectives and host syncs")."""
    start = time.perf_counter()
    res = optimizer_step(stepper, mbs, n_global, grad_scale=float(world), kernels=kernels, device=device)
    notice = pending()
    loss = res.loss.detach().reshape(1).to(torch.float64)
    flags = torch.tensor([float(res.tokens), 0.0 if notice is None else 1.0], dtype=torch.float64)
    summed = collectives.sum_on_device(torch.cat([loss, flags.to(loss.device, non_blocking=True)]))
    norm = res.norm if isinstance(res.norm, torch.Tensor) else torch.tensor(res.grad_norm)
    loss_sum, tokens, notices, grad_norm = collectives.to_host(
        torch.cat([summed, norm.detach().reshape(1).to(summed.device, torch.float64)])
    )
    return StepNumbers(loss_sum, tokens, notices, grad_norm, res.lr, time.perf_counter() - start, notice)


def _evaluate(
    engine, eval_table, rank: int, world: int, micro: int, kernels: bool, device, layout: str
) -> dict[str, float]:
    """Loss and perplexity over the whole eval set: sum CE / trained tokens, summed over ranks."""
    n = eval_table.num_rows
    chunks = [list(range(i, min(i + micro, n))) for i in range(0, n, micro)]
    per_rank = math.ceil(len(chunks) / world)
    mine = chunks[rank::world]
    # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively); padding counts 0.
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [chunks[0]] * (per_rank - len(mine))
    mbs = [collate_table(eval_table, c, layout) for c in mine]
    s, cnt = eval_loss_sum(engine.module, mbs, weights, kernels=kernels, device=device)
    total, n = collectives.sum_to_host([s, float(cnt)])
    loss = total / max(n, 1.0)
    return {"eval_loss": loss, "eval_ppl": float(math.exp(min(loss, 50.0)))}


def _base_weight_residency(model: torch.nn.Module) -> dict[str, int]:
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


def note_preemption(run_dir: Path | None, step: int, ranks: float, notice: Notice | None) -> None:
    """Rank 0 (run_dir set): one events.jsonl line and one log line when the ranks first agree on a notice."""
    if run_dir is None:
        return
    what = notice.to_dict() if notice is not None else {"reason": "another rank's notice"}
    append_event(run_dir, {"event": "preemption", "step": step, "ranks_notified": int(ranks), **what})
    print(f"[raysft] preemption notice ({what['reason']}): checkpoint at step {step}, then every step", flush=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry: the shard indexes from the driver, the context from ray.train."""
    cfg = Config.from_dict(loop_config["config"])
    ctx = RayTrainContext(resume_from=loop_config.get("resume_from"), upload=cfg.train.checkpoint_upload)
    # Rank 0 writes the run's files into the run folder, or into a staging copy of one on an object store
    # (published before each checkpoint registers, so a restarted group continues them).
    folder = RunFolder(loop_config["run_dir"], StorageOptions.of(cfg)) if ctx.rank == 0 else None
    remote = storage.is_remote(loop_config["run_dir"])
    run_dir = folder.local if folder is not None else Path(tempfile.gettempdir() if remote else loop_config["run_dir"])
    eval_index = loop_config.get("eval_index")
    try:
        run_worker(
            cfg,
            SyncedContext(ctx, folder) if remote else ctx,
            ShardIndex.from_dict(loop_config["train_index"]),
            ShardIndex.from_dict(eval_index) if eval_index is not None else None,
            run_dir,
            loop_config.get("deepspeed_json"),
        )
    finally:
        if folder is not None:
            folder.close()


def import_deepspeed():
    """`import deepspeed` without the mlflow import its autotuner makes whenever mlflow is installed (2-7 s of
    CPU per worker process on a small machine); raysft never runs DeepSpeed's autotuner. The guard lasts for
    this one import: mlflow stays importable afterwards (rank 0's tracking), and one already imported is used."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed's autotuner expects
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def run_worker(
    cfg: Config,
    ctx: WorkerContext,
    train_index: ShardIndex,
    eval_index: ShardIndex | None,
    run_dir: Path,
    deepspeed_json: dict[str, Any] | None = None,
    rows_per_step: int | None = None,
) -> None:
    """Train `cfg` on the packed rows of `train_index`'s shards as rank ctx.rank of ctx.world_size.

    A step trains `rows_per_step` rows (default `cfg.rows_per_step()`, fixed by the config) at any world size:
    each rank takes rows / (world x micro_batch_size) micro-batches, so a resized run trains the same rows per step.
    """
    deepspeed = import_deepspeed()

    # --- who am I, what do I train on ---------------------------------------------------------
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    t = cfg.train
    rows_per_step = rows_per_step or cfg.rows_per_step()
    accum = accumulation(rows_per_step, world, t.micro_batch_size)  # micro-batches per rank at this world size
    reader = reader_for(
        train_index,
        seed=t.seed,
        window=t.shuffle_window,
        rows_per_step=rows_per_step,
        max_steps=t.max_steps,
        epochs=t.epochs,
        columns=REQUIRED_COLUMNS,
    )
    eval_table = read_all(eval_index, REQUIRED_COLUMNS) if eval_index is not None else None
    plan = reader.layout
    total = plan.total_steps
    layout = layout_for(cfg)
    step_split = np.arange(plan.rows_per_step).reshape(accum, world, t.micro_batch_size)

    # --- model, optimizer, DeepSpeed ----------------------------------------------------------
    torch.manual_seed(t.seed)
    model = build_model(cfg, device=str(device))
    optimizer, scheduler = make_optimizer(model, t, total)
    if device.type == "cpu":
        # The shared-memory all-reduce op (JIT-compiled, ~2 min) only serves inference collectives;
        # training over gloo does not use it, so do not build it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, deepspeed_json, grad_accum=accum),
        dist_init_required=False,
    )
    stepper = DeepSpeedStepEngine(engine)
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed + rank)  # per-rank dropout masks
    if device.type == "cuda":
        torch.cuda.manual_seed(t.seed + rank)

    # --- resume: weights, optimizer, scheduler, RNG, data position, ledger ------------------------
    start, trained_tokens = 0, 0
    ledger = Ledger(run_dir / LEDGER_FILE)
    with ctx.latest_checkpoint() as d:
        if d is not None:
            state = ckpt_io.load(engine, d, rank=rank, device=device)  # re-partitioned when the world size changed
            if rank == 0:
                ledger.rewind(state["step"], source=Path(d) / LEDGER_FILE)
            start, trained_tokens = state["step"], state["trained_tokens"]
        elif rank == 0 and ledger.path.exists():
            ledger.path.unlink()  # a fresh run of this name starts a fresh ledger
    metrics_log = MetricsLog(run_dir, t.logging, cfg.to_dict(), cfg.run.name, resume_step=start) if rank == 0 else None
    config_yaml = cfg.dump_yaml()
    if rank == 0:
        append_event(
            run_dir,
            {
                "event": "start",
                "step": start,
                "world_size": world,
                "grad_accum": accum,
                "rows_per_step": plan.rows_per_step,
                "total_steps": total,
                "rows_left_out_per_epoch": plan.left_out_per_epoch,
                "data_position": dict(zip(("epoch", "row"), plan.position(start))),
                "zero_stage": cfg.train.deepspeed.stage,
                **_base_weight_residency(engine.module),
            },
        )
        print(
            f"[raysft] training {total} steps on {world} worker(s) from step {start} "
            f"({plan.n_rows} packed rows, {plan.left_out_per_epoch} left out per epoch to balance ranks)",
            flush=True,
        )

    # --- the loop ----------------------------------------------------------------------------
    watch = PreemptionWatch(ctx.drain_notice)  # SIGTERM (main thread only) or Ray's drain notice
    preempted_at: int | None = None  # the step boundary where the ranks first agreed on a notice
    for step in range(start, total):
        epoch, step_table = reader.step(step)  # the step's rows, streamed from the shards of its window
        rows = step_split  # rows[accum, world, micro]: indices into step_table
        mine = rows[:, rank, :]
        # The step's trained tokens (all ranks) normalise the loss. Every rank holds the whole step's rows,
        # so each counts them all on the host: no collective, no device sync.
        row_trained = trained_counts(step_table.column("labels"))  # vectorised
        n_global = int(row_trained[rows.reshape(-1)].sum())
        mbs = _micro_batches(step_table, mine, layout)
        # The step's all-reduce also carries the ranks' preemption notices: all agree at this boundary.
        res = train_step(stepper, mbs, n_global, world=world, kernels=t.kernels, device=device, pending=watch.pending)
        preempting = res.notices > 0
        trained_tokens += n_global
        done = step + 1
        metrics: dict[str, Any] = {
            "step": done,
            "epoch": epoch,
            "loss": res.loss_sum / max(n_global, 1),
            "lr": res.lr,
            "grad_norm": res.grad_norm,
            "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
            "trained_tokens": trained_tokens,
        }
        last = done == total
        if eval_table is not None and eval_table.num_rows > 0 and (done % t.eval_every == 0 or last):
            metrics.update(_evaluate(engine, eval_table, rank, world, t.micro_batch_size, t.kernels, device, layout))
        if rank == 0:
            ledger.append(done, epoch, _step_sources(step_table, rows))
            metrics_log.log(metrics)
            extra = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            print(
                f"[raysft] step {done}/{total} loss {metrics['loss']:.4f} lr {res.lr:.2e} "
                f"{metrics['tokens_per_s']:.0f} tok/s{extra}",
                flush=True,
            )

        if preempting and preempted_at is None:
            preempted_at = done
            note_preemption(run_dir if rank == 0 else None, done, res.notices, res.notice)
        gen_eval = generate_eval.due(cfg, done, last)  # runs on this step's checkpoint, off the workers
        # While a notice stands, every boundary is a checkpoint: losing the node costs at most the step in flight.
        if done % t.save_every == 0 or last or gen_eval or preempting:
            saving = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(prefix=f"raysft-ckpt-r{rank}-"))
            state = {
                "step": done,
                "epoch": epoch,
                "trained_tokens": trained_tokens,
                "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": total,
                "data_position": dict(zip(("epoch", "row"), plan.position(done))),
            }
            try:
                ckpt_io.save(
                    engine,
                    tmp,
                    rank=rank,
                    state=state,
                    ledger_path=ledger.path if rank == 0 else None,
                    config_yaml=config_yaml,
                    storage=run_dir,
                    device=device,
                    resizable=cfg.scaling.elastic,
                )
                if rank == 0:
                    append_event(
                        run_dir, {"event": "reader", "step": done, "start": start, **reader.counters.to_dict()}
                    )
                written = time.perf_counter()
                # ctx owns tmp from here; under a notice the upload finishes before the next step starts
                ctx.report(metrics, checkpoint_dir=tmp, step=done, validation=gen_eval, durable=preempting)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if rank == 0:
                append_event(
                    run_dir,
                    {
                        "event": "checkpoint",
                        "step": done,
                        "write_s": round(written - saving, 4),
                        "report_s": round(time.perf_counter() - written, 4),
                        "upload": "sync" if preempting else cfg.train.checkpoint_upload,
                        "preemption": preempting,
                    },
                )
        else:
            ctx.report(metrics)

    watch.close()
    reader.close()
    if metrics_log is not None:
        metrics_log.close()
