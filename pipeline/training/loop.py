"""The per-worker training loop: QLoRA with DeepSpeed on packed rows. `run_worker` reads as a recipe:
setup (data, model and DeepSpeed engine), resume, the step loop, checkpoint (`WorkerRecipe`; DeepSpeed itself is
training/engine.py).

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
from raysft.pipeline.training.engine import DeepSpeedStepEngine, base_weight_residency, import_deepspeed, initialize
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
    import_deepspeed()  # first, so no later import (transformers, peft) loads DeepSpeed with its mlflow import
    recipe = WorkerRecipe(cfg, ctx, run_dir)
    recipe.setup_data(train_index, eval_index, rows_per_step or cfg.rows_per_step())
    recipe.setup_model(deepspeed_json)
    recipe.resume()
    recipe.train()
    recipe.close()


class WorkerRecipe:
    """One worker's run, laid out as torchtune's recipes are: `setup_data`, `setup_model` (model, optimizer,
    DeepSpeed engine), `resume`, `train` (the step loop; `save_checkpoint` at its save boundaries), `close`.
    Each stage sets the attributes the later ones read; rank 0 also keeps the run folder's files."""

    def __init__(self, cfg: Config, ctx: WorkerContext, run_dir: Path):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # DeepSpeed and NCCL use the current device

    # --- setup ---------------------------------------------------------------------------------

    def setup_data(self, train_index: ShardIndex, eval_index: ShardIndex | None, rows_per_step: int) -> None:
        """The step reader over the train shards, the eval rows (read whole), and how a step's rows split into
        micro-batches over this world."""
        t = self.cfg.train
        self.accum = accumulation(rows_per_step, self.world, t.micro_batch_size)  # micro-batches per rank
        self.reader = reader_for(
            train_index,
            seed=t.seed,
            window=t.shuffle_window,
            rows_per_step=rows_per_step,
            max_steps=t.max_steps,
            epochs=t.epochs,
            columns=REQUIRED_COLUMNS,
        )
        self.eval_table = read_all(eval_index, REQUIRED_COLUMNS) if eval_index is not None else None
        self.plan = self.reader.layout
        self.layout = layout_for(self.cfg)
        # step_split[accum, world, micro]: indices into a step's rows; rank r trains step_split[:, r, :]
        self.step_split = np.arange(self.plan.rows_per_step).reshape(self.accum, self.world, t.micro_batch_size)

    def setup_model(self, deepspeed_json: dict[str, Any] | None) -> None:
        """The model (the same initial LoRA weights on every rank), AdamW and its schedule, the DeepSpeed engine;
        then each rank's own RNG streams (dropout masks)."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        model = build_model(self.cfg, device=str(self.device))
        optimizer, scheduler = make_optimizer(model, t, self.plan.total_steps)
        self.engine = initialize(
            self.cfg,
            model,
            optimizer,
            scheduler,
            world_size=self.world,
            grad_accum=self.accum,
            device=self.device,
            user_json=deepspeed_json,
        )
        self.stepper = DeepSpeedStepEngine(self.engine)
        seed_rank(t.seed + self.rank, self.device)

    # --- resume --------------------------------------------------------------------------------

    def resume(self) -> None:
        """Weights, optimizer, scheduler, RNG, data position and ledger from the latest checkpoint (re-partitioned
        when the world size changed), or a fresh ledger; rank 0 opens the metrics and notes the start."""
        self.start, self.trained_tokens = 0, 0
        self.ledger = Ledger(self.run_dir / LEDGER_FILE)
        with self.ctx.latest_checkpoint() as d:
            if d is not None:
                state = ckpt_io.load(self.engine, d, rank=self.rank, device=self.device)
                if self.rank == 0:
                    self.ledger.rewind(state["step"], source=Path(d) / LEDGER_FILE)
                self.start, self.trained_tokens = state["step"], state["trained_tokens"]
            elif self.rank == 0 and self.ledger.path.exists():
                self.ledger.path.unlink()  # a fresh run of this name starts a fresh ledger
        cfg = self.cfg
        self.metrics_log = (
            MetricsLog(self.run_dir, cfg.train.logging, cfg.to_dict(), cfg.run.name, resume_step=self.start)
            if self.rank == 0
            else None
        )
        self.config_yaml = cfg.dump_yaml()
        if self.rank == 0:
            self._note_start()

    def _note_start(self) -> None:
        """Rank 0: the start line of events.jsonl (world, data position, residency of the base) and the log."""
        plan, start, total = self.plan, self.start, self.plan.total_steps
        append_event(
            self.run_dir,
            {
                "event": "start",
                "step": start,
                "world_size": self.world,
                "grad_accum": self.accum,
                "rows_per_step": plan.rows_per_step,
                "total_steps": total,
                "rows_left_out_per_epoch": plan.left_out_per_epoch,
                "data_position": dict(zip(("epoch", "row"), plan.position(start))),
                "zero_stage": self.cfg.train.deepspeed.stage,
                **base_weight_residency(self.engine.module),
            },
        )
        print(
            f"[raysft] training {total} steps on {self.world} worker(s) from step {start} "
            f"({plan.n_rows} packed rows, {plan.left_out_per_epoch} left out per epoch to balance ranks)",
            flush=True,
        )

    # --- the step loop -------------------------------------------------------------------------

    def train(self) -> None:
        """From the resumed step to the last: one optimizer step, its metrics and rank 0's record, then a checkpoint
        at a save boundary (every boundary while a preemption notice stands), else a report of the metrics."""
        t, total = self.cfg.train, self.plan.total_steps
        watch = PreemptionWatch(self.ctx.drain_notice)  # SIGTERM (main thread only) or Ray's drain notice
        preempted_at: int | None = None  # the step boundary where the ranks first agreed on a notice
        for step in range(self.start, total):
            epoch, step_table = self.reader.step(step)  # the step's rows, streamed from the shards of its window
            done = step + 1
            last = done == total
            res, metrics = self.run_step(step_table, epoch, done, last, watch.pending)
            if self.rank == 0:
                self._record_step(step_table, epoch, metrics)
            preempting = res.notices > 0
            if preempting and preempted_at is None:
                preempted_at = done
                note_preemption(self.run_dir if self.rank == 0 else None, done, res.notices, res.notice)
            gen_eval = generate_eval.due(self.cfg, done, last)  # runs on this step's checkpoint, off the workers
            # While a notice stands, every boundary is a checkpoint: losing the node costs at most the step in flight.
            if done % t.save_every == 0 or last or gen_eval or preempting:
                self.save_checkpoint(done, epoch, metrics, validation=gen_eval, preempting=preempting)
            elif res.waiting_reports == 0 or "eval_loss" in metrics or self.cfg.scaling.elastic:
                self.ctx.report(metrics)
            else:  # a rank's last report is not taken yet: skip this one on every rank rather than wait for it
                self.ctx.progress()
        watch.close()

    def run_step(
        self, step_table, epoch: int, done: int, last: bool, pending: Callable[[], Notice | None]
    ) -> tuple[StepNumbers, dict[str, Any]]:
        """One optimizer step on this rank's micro-batches of the step's rows; its metrics, with the eval when due."""
        t = self.cfg.train
        rows = self.step_split
        # The step's trained tokens (all ranks) normalise the loss. Every rank holds the whole step's rows,
        # so each counts them all on the host: no collective, no device sync.
        row_trained = trained_counts(step_table.column("labels"))  # vectorised
        n_global = int(row_trained[rows.reshape(-1)].sum())
        mbs = _micro_batches(step_table, rows[:, self.rank, :], self.layout)
        # The step's all-reduce also carries the ranks' preemption notices and whether a report would wait:
        # all agree at this boundary.
        res = train_step(
            self.stepper,
            mbs,
            n_global,
            world=self.world,
            kernels=t.kernels,
            device=self.device,
            pending=pending,
            report_would_wait=self.ctx.report_would_wait,
        )
        self.trained_tokens += n_global
        metrics: dict[str, Any] = {
            "step": done,
            "epoch": epoch,
            "loss": res.loss_sum / max(n_global, 1),
            "lr": res.lr,
            "grad_norm": res.grad_norm,
            "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
            "trained_tokens": self.trained_tokens,
        }
        evals = self.eval_table
        if evals is not None and evals.num_rows > 0 and (done % t.eval_every == 0 or last):
            metrics.update(
                _evaluate(
                    self.engine, evals, self.rank, self.world, t.micro_batch_size, t.kernels, self.device, self.layout
                )
            )
        return res, metrics

    def _record_step(self, step_table, epoch: int, metrics: dict[str, Any]) -> None:
        """Rank 0: the step's source ids in the ledger, its metrics in metrics.jsonl (and sinks), one log line."""
        done = metrics["step"]
        self.ledger.append(done, epoch, _step_sources(step_table, self.step_split))
        self.metrics_log.log(metrics)
        extra = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
        print(
            f"[raysft] step {done}/{self.plan.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['tokens_per_s']:.0f} tok/s{extra}",
            flush=True,
        )

    # --- checkpoint and report -----------------------------------------------------------------

    def save_checkpoint(
        self, done: int, epoch: int, metrics: dict[str, Any], *, validation: bool, preempting: bool
    ) -> None:
        """Every rank writes its part of checkpoint `done` into a temporary folder that ctx.report registers with
        the step's metrics; rank 0 notes the reader's counters and what the step waited (events.jsonl)."""
        rank, plan = self.rank, self.plan
        saving = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"raysft-ckpt-r{rank}-"))
        state = {
            "step": done,
            "epoch": epoch,
            "trained_tokens": self.trained_tokens,
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "data_position": dict(zip(("epoch", "row"), plan.position(done))),
        }
        try:
            ckpt_io.save(
                self.engine,
                tmp,
                rank=rank,
                state=state,
                ledger_path=self.ledger.path if rank == 0 else None,
                config_yaml=self.config_yaml,
                storage=self.run_dir,
                device=self.device,
                resizable=self.cfg.scaling.elastic,
            )
            if rank == 0:
                append_event(
                    self.run_dir,
                    {"event": "reader", "step": done, "start": self.start, **self.reader.counters.to_dict()},
                )
            written = time.perf_counter()
            # ctx owns tmp from here; under a notice the upload finishes before the next step starts
            self.ctx.report(metrics, checkpoint_dir=tmp, step=done, validation=validation, durable=preempting)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if rank == 0:
            append_event(
                self.run_dir,
                {
                    "event": "checkpoint",
                    "step": done,
                    "write_s": round(written - saving, 4),
                    "report_s": round(time.perf_counter() - written, 4),
                    "upload": "sync" if preempting else self.cfg.train.checkpoint_upload,
                    "preemption": preempting,
                },
            )

    def close(self) -> None:
        """The reader's prefetch and rank 0's metrics sinks."""
        self.reader.close()
        if self.metrics_log is not None:
            self.metrics_log.close()


def seed_rank(seed: int, device: torch.device) -> None:
    """Python, NumPy, torch (and the GPU's) RNG of this rank from `seed` (the run's seed + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # per-rank dropout masks
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


@dataclass
class StepNumbers:
    """What the loop reads of a step on the host, summed over ranks, after the step's one host sync."""

    loss_sum: float
    tokens: float
    notices: float  # ranks holding a preemption notice
    waiting_reports: float  # ranks whose last metrics report the runtime has not taken yet
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
    report_would_wait: Callable[[], bool] = lambda: False,
) -> StepNumbers:
    """One optimizer step, its one all-reduce (loss sum, tokens, preemption notices, reports not yet taken) and
    one host read.

    `pending` (this rank's notice) is read after the backward passes, so a notice that arrives during the
    step is agreed on at its end; the grad norm comes back in the same device-to-host copy
    (ARCHITECTURE.md, "Collectives and host syncs"). `report_would_wait` is read there too: a metrics report
    is skipped on every rank alike when any rank's last one is still waiting (the same section)."""
    start = time.perf_counter()
    res = optimizer_step(stepper, mbs, n_global, grad_scale=float(world), kernels=kernels, device=device)
    notice = pending()
    loss = res.loss.detach().reshape(1).to(torch.float64)
    flags = [float(res.tokens), 0.0 if notice is None else 1.0, 1.0 if report_would_wait() else 0.0]
    flags_t = torch.tensor(flags, dtype=torch.float64)
    summed = collectives.sum_on_device(torch.cat([loss, flags_t.to(loss.device, non_blocking=True)]))
    norm = res.norm if isinstance(res.norm, torch.Tensor) else torch.tensor(res.grad_norm)
    loss_sum, tokens, notices, waiting, grad_norm = collectives.to_host(
        torch.cat([summed, norm.detach().reshape(1).to(summed.device, torch.float64)])
    )
    return StepNumbers(loss_sum, tokens, notices, waiting, grad_norm, res.lr, time.perf_counter() - start, notice)


def _micro_batches(table, rows: np.ndarray, layout: str) -> list[MicroBatch]:
    """rows[k, m]: k micro-batches of m packed rows each."""
    return [collate_table(table, rows[k].tolist(), layout) for k in range(rows.shape[0])]


def _step_sources(table, rows: np.ndarray) -> list[int]:
    """Source ids of ALL rows of a step, in step order (for the ledger, on rank 0 only): Arrow, no Python rows."""
    import pyarrow.compute as pc

    taken = table.column("source_ids").take(rows.reshape(-1))
    return pc.list_flatten(taken).to_numpy(zero_copy_only=False).tolist()


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


def note_preemption(run_dir: Path | None, step: int, ranks: float, notice: Notice | None) -> None:
    """Rank 0 (run_dir set): one events.jsonl line and one log line when the ranks first agree on a notice."""
    if run_dir is None:
        return
    what = notice.to_dict() if notice is not None else {"reason": "another rank's notice"}
    append_event(run_dir, {"event": "preemption", "step": step, "ranks_notified": int(ranks), **what})
    print(f"[raysft] preemption notice ({what['reason']}): checkpoint at step {step}, then every step", flush=True)


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
