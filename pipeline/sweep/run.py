"""`raysft tune`: a Ray Tune sweep in which every trial is a full Ray Train run of the config.

Ray 2.60 with Train V2: Tune runs a function trainable (`run_trial`) that builds the trial's
`TorchTrainer` with `TuneReportCallback`, so each `ray.train.report` of the training is one Tune
result that ASHA can act on (its clock is the training's `step`). The data is prepared once, in the
driver, before any trial starts; trials read the prepared Parquet and never tokenize.

The sweep folder (run.storage_path/run.name) holds:
    sweep.yaml        the resolved config the sweep started with (a resume must match it)
    tune/             Ray Tune's experiment state (what `--resume` restores)
    trials/ID/        each trial's Ray Train run: checkpoints, metrics.jsonl, adapter/, trial.json
    events.jsonl      one line per trial start, end, early stop or error, as they happen
    results.csv, loss_vs_lr.png, eval_curves.png, best_adapter/, best_config.yaml

run.storage_path may be an s3:// or gs:// URI: Tune keeps its experiment folder there
(`RunConfig(storage_path, storage_filesystem)`), each trial's Ray Train run writes its run folder there
(training/run_files.py), and the driver writes its own files into a local staging copy of the sweep
folder (`RunFolder`) that it uploads after writing sweep.yaml and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from ray import tune as rt
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from raysft.pipeline import jsonl, lease, ray_runtime, storage
from raysft.pipeline.cluster_checks import (
    TRIAL_DRIVER_CPUS,
    Capacity,
    check_shared_storage,
    eval_task_need,
    read_capacity,
    trials_that_fit,
)
from raysft.pipeline.config import Config
from raysft.pipeline.data.plan import ensure_prepared
from raysft.pipeline.data.shards import load_index
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.run_folder import (
    ATTEMPTS_FILE,
    BEST_ADAPTER,
    BEST_CONFIG,
    EVENTS_FILE,
    RESULTS_CSV,
    SWEEP_CONFIG,
    SWEEP_DRIVER_FILES,
    SWEEP_PLOTS,
    TRIAL_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    RunFolder,
)
from raysft.pipeline.storage import StorageOptions
from raysft.pipeline.sweep.report import (
    COMPLETED,
    EARLY_STOPPED,
    ERROR,
    INTERRUPTED,
    BestTrial,
    SweepResult,
    TrialRecord,
    pick_best,
    plot_curves,
    plot_loss_vs_lr,
    table_row,
    write_csv,
)
from raysft.pipeline.sweep.space import SweepPlan, data_overrides, plan_sweep, trial_overrides
from raysft.pipeline.tracking import finish_sweep_tracking, finish_tracking, start_sweep_tracking
from raysft.pipeline.trainer import build_trainer, finish_run, hold_run_folder, preflight
from raysft.pipeline.training.generate_eval import generation_history
from raysft.pipeline.training.reader import StepLayout

log = logging.getLogger("raysft.tune")

WORST = 1e30  # what a diverged trial's metric counts as for ASHA (mode min; negated for max)
ASHA_MAX_T = 2**31  # ASHA stops at max_t; trials end by their own step count instead
# The same names a resumed sweep may change (where to reach the cluster is not part of the sweep).
RESUME_MAY_DIFFER = ("run.address",)


def tune(cfg: Config, resume: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the sweep declared in `cfg.tune`; returns the table and the best trial."""
    # torch, with the trainer (not needed to check a sweep's config)

    plan = plan_sweep(cfg)  # every user error in the tune section, before anything starts
    data_cfg = cfg  # data paths as written, so the data cache key matches `raysft train`'s
    cfg = preflight(cfg)  # model, tokenizer, storage: checked, and local paths made absolute for the trials
    sweep_dir = storage.join(cfg.run.storage_path, cfg.run.name)  # a local folder or a URI
    options = storage.StorageOptions.of(cfg)
    with lease.hold(lease.in_folder(sweep_dir), f"The sweep folder {sweep_dir}", options):  # one driver per sweep
        _check_sweep_folder(cfg, sweep_dir, resume)
        folder = RunFolder(sweep_dir, options, names=SWEEP_DRIVER_FILES)
        try:
            with ray_runtime.session(cfg.run.address, ray_runtime.TRAIN):
                return _run_sweep(cfg, data_cfg, plan, folder, resume)
        finally:
            folder.close()  # uploads what the driver wrote (a remote sweep folder)


def _run_sweep(cfg: Config, data_cfg: Config, plan: SweepPlan, folder: RunFolder, resume: bool) -> SweepResult:
    sweep_dir, local = folder.uri, folder.local  # the sweep folder, and where this driver writes its files
    tune_storage, tune_fs = storage.ray_storage(sweep_dir, folder.options)
    tracking_parent = start_sweep_tracking(cfg, local)  # one MLflow parent run; trials are its children
    capacity = read_capacity()
    concurrency = max_concurrent_trials(cfg, capacity)
    if not folder.remote:
        check_shared_storage(local, cfg.scaling)
    prepared = _prepare_all(data_cfg, plan)  # tokenizes at most once per distinct data config
    trainable = rt.with_resources(
        rt.with_parameters(
            run_trial,
            base=cfg.to_dict(),
            source=cfg.source,
            plan=plan,
            prepared=prepared,
            trials_dir=storage.join(sweep_dir, TRIALS_DIR),
            tracking_parent=tracking_parent,
        ),
        trial_resources(cfg),
    )
    with _sparse_metrics():
        if resume:
            log.info("resuming the sweep in %s", sweep_dir)
            tuner = rt.Tuner.restore(
                f"{tune_storage}/{TUNE_DIR}",
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=False,
                storage_filesystem=tune_fs,
            )
        else:
            local.mkdir(parents=True, exist_ok=True)
            (local / SWEEP_CONFIG).write_text(cfg.dump_yaml())
            folder.push((SWEEP_CONFIG,))
            tuner = rt.Tuner(
                trainable,
                param_space=plan.param_space(),
                tune_config=rt.TuneConfig(
                    metric=plan.metric,
                    mode=plan.mode,
                    num_samples=cfg.tune.num_samples,
                    scheduler=_scheduler(
                        cfg, local, PlannedSteps(cfg.to_dict(), cfg.source, plan, _rows(prepared, cfg))
                    ),
                    search_alg=search_alg(cfg, plan, concurrency),
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=rt.RunConfig(
                    name=TUNE_DIR,
                    storage_path=tune_storage,
                    storage_filesystem=tune_fs,  # None for a folder; pyarrow's (no credentials in it) for a URI
                    callbacks=[SweepEvents(str(local / EVENTS_FILE))],
                    failure_config=rt.FailureConfig(max_failures=0),
                    verbose=1,
                ),
            )
        grid = tuner.fit()
    sweep = _collect(cfg, plan, folder, grid)
    finish_sweep_tracking(local, sweep)
    return sweep


# --- the trial ----------------------------------------------------------------------------------


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    source: str | None,
    plan: SweepPlan,
    prepared: dict[str, Any],
    trials_dir: str,
    tracking_parent: dict[str, Any] | None = None,
) -> None:
    """One Tune trial: the config with the sampled values, trained by its own TorchTrainer."""
    trial_id = rt.get_context().get_trial_id()
    cfg = trial_config(Config.from_dict(base, source), plan, config, trial_id, trials_dir)
    run_dir = storage.join(trials_dir, trial_id)  # a folder or a URI
    # A trial's run folder has one writer, like any run's; a resumed trial waits out the lease of a previous
    # attempt that died with its node (it cannot renew it), instead of failing.
    with hold_run_folder(cfg, run_dir, wait_elsewhere=True):
        _train_trial(cfg, config, plan, prepared, run_dir, trial_id, tracking_parent)


def _train_trial(
    cfg: Config,
    config: dict[str, Any],
    plan: SweepPlan,
    prepared: dict[str, Any],
    run_dir: str,
    trial_id: str,
    tracking_parent: dict[str, Any] | None,
) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    # torch, with the trainer, in each trial's process

    options = storage.StorageOptions.of(cfg)
    attempt = json.dumps({"started": time.time(), "pid": os.getpid()}) + "\n"
    storage.append_bytes(storage.join(run_dir, ATTEMPTS_FILE), attempt.encode(), options)
    data = prepared[_variant_key(data_overrides(plan, config))]
    trainer = build_trainer(cfg, data, callbacks=[TuneReportCallback()], tracking_parent=tracking_parent)
    try:
        result = trainer.fit()  # a resumed trial's trainer continues from its latest checkpoint (same storage/name)
    except BaseException:
        finish_tracking(run_dir, None, status="FAILED")  # the trial's MLflow child run, if any
        raise
    finished = finish_run(cfg, result)  # the final adapter into run_dir/adapter
    storage.write_bytes(
        storage.join(run_dir, TRIAL_FILE),
        json.dumps(
            {
                "trial_id": trial_id,
                "status": COMPLETED,
                "finished": time.time(),
                "adapter": str(finished.adapter_path),
                "params": trial_overrides(plan, config, cfg),
            },
            indent=2,
        ).encode(),
        options,
    )


def trial_config(base: Config, plan: SweepPlan, sampled: dict[str, Any], trial_id: str, trials_dir: str) -> Config:
    """The base config with the trial's values, run as trials_dir/trial_id."""
    overrides = trial_overrides(plan, sampled, base)
    overrides.update({"run.storage_path": trials_dir, "run.name": trial_id})
    return base.with_overrides(overrides)


def best_config(base: Config, plan: SweepPlan, params: dict[str, Any]) -> Config:
    """The best trial's resolved config, ready for `raysft train`: its values, a run name of its own, no sweep."""
    out = base.with_overrides({**trial_overrides(plan, params, base), "run.name": f"{base.run.name}-best", "tune": {}})
    object.__setattr__(out, "source", base.source)
    return out


def _trial_dirname(trial) -> str:
    return trial.trial_id


# --- resources ------------------------------------------------------------------------------------


def trial_resources(cfg: Config) -> dict[str, float]:
    """What Tune reserves for a trial: its driver (1 CPU). Its Ray Train workers reserve their own."""
    return {"CPU": TRIAL_DRIVER_CPUS}


def max_concurrent_trials(cfg: Config, cluster: Capacity | dict[str, float]) -> int:
    """How many trials fit the cluster at once, grown to its autoscaler's maximum (never more than
    tune.max_concurrent_trials)."""
    capacity = cluster if isinstance(cluster, Capacity) else Capacity(dict(cluster))
    fits = trials_that_fit(cfg.scaling, capacity, eval_task_need(cfg))
    wanted = cfg.tune.max_concurrent_trials
    if wanted is not None and wanted > fits:
        log.warning("tune.max_concurrent_trials %d does not fit the cluster; running %d at a time", wanted, fits)
    return min(fits, wanted) if wanted is not None else fits


# --- data: prepared once, before the trials -----------------------------------------------------


def _variant_key(overrides: dict[str, Any]) -> str:
    return json.dumps(overrides, sort_keys=True, default=str)


def _prepare_all(cfg: Config, plan: SweepPlan) -> dict[str, Any]:
    """One prepared dataset per distinct data config the sweep can sample (usually exactly one)."""
    out = {}
    for variant in plan.data_variants():
        p = ensure_prepared(cfg.with_overrides(variant) if variant else cfg)
        if isinstance(p.train_dir, Path):  # a cache on an object store keeps its URIs
            p = dataclasses.replace(
                p, train_dir=p.train_dir.resolve(), eval_dir=Path(p.eval_dir).resolve() if p.eval_dir else None
            )
        out[_variant_key(variant)] = p
    return out


def _check_sweep_folder(cfg: Config, sweep_dir: str, resume: bool) -> None:
    """A new sweep needs a writable folder that holds no sweep; a resumed one, a sweep started with the same config."""
    options = storage.StorageOptions.of(cfg)
    tune_storage, tune_fs = storage.ray_storage(sweep_dir, options)
    tune_path = f"{tune_storage}/{TUNE_DIR}"
    if resume:
        if not rt.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
            raise ConfigError(
                f"There is no sweep to resume in {sweep_dir} (run.storage_path/run.name); start it without --resume."
            )
        saved_yaml = storage.read_bytes(storage.join(sweep_dir, SWEEP_CONFIG), options)
        saved = Config.from_dict(yaml.safe_load(saved_yaml), cfg.source)
        diff = _first_difference(saved.to_dict(), cfg.to_dict())
        if diff and diff not in RESUME_MAY_DIFFER:
            raise ConfigError(
                f"Config key '{diff}' differs from the interrupted sweep's {storage.join(sweep_dir, SWEEP_CONFIG)}; "
                "resume with the same config."
            )
        return
    if storage.exists(storage.join(sweep_dir, TUNE_DIR), options):
        raise ConfigError(f"{sweep_dir} already holds a sweep; continue it with --resume or choose another run.name.")
    if storage.is_remote(sweep_dir):
        return  # the store, bucket and credentials were checked by preflight
    try:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(sweep_dir) / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError:
        raise ConfigError(
            f"run.storage_path {cfg.run.storage_path} is not writable (cannot create {sweep_dir})."
        ) from None


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if found and found not in RESUME_MAY_DIFFER:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


# --- Tune pieces --------------------------------------------------------------------------------


def _scheduler(cfg: Config, local: Path, planned_steps: PlannedSteps):
    if cfg.tune.scheduler == "none":
        return None
    return SweepASHA(
        str(local / EVENTS_FILE),
        planned_steps,
        time_attr="step",
        max_t=ASHA_MAX_T,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


@dataclasses.dataclass
class PlannedSteps:
    """How many optimizer steps a trial runs (its values may change max_steps, batch sizes or data)."""

    base: dict[str, Any]
    source: str | None
    plan: SweepPlan
    rows: dict[str, int]  # packed train rows per data variant

    def __call__(self, sampled: dict[str, Any]) -> int:

        base = Config.from_dict(self.base, self.source)
        cfg = base.with_overrides(trial_overrides(self.plan, sampled, base))
        t = cfg.train
        n_rows = self.rows[_variant_key(data_overrides(self.plan, sampled))]
        return StepLayout(n_rows, cfg.rows_per_step(), t.max_steps, t.epochs).total_steps


def _rows(prepared: dict[str, Any], cfg: Config) -> dict[str, int]:
    """Packed train rows per data variant, from the shard indexes (no rows are read)."""
    return {key: load_index(str(p.train_dir), StorageOptions.of(cfg), check=False).rows for key, p in prepared.items()}


def search_alg(cfg: Config, plan: SweepPlan, concurrency: int):
    """The search algorithm, limited to `concurrency` trials at a time (Tune ignores
    TuneConfig.max_concurrent_trials when it is given a BasicVariantGenerator, so the limit goes here)."""
    if cfg.tune.search_alg == "optuna":
        optuna = SparseMetricOptuna(metric=plan.metric, mode=plan.mode, seed=cfg.train.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.train.seed)


class SweepASHA(ASHAScheduler):
    """ASHA that logs each early stop to events.jsonl and ranks a NaN or infinite metric (a diverged
    trial) as the worst finite value, which stock ASHA would never stop (NaN compares false) or would
    turn into NaN cut-offs for later trials (inf)."""

    def __init__(self, events_path: str, planned_steps: Callable[[dict], int], **kwargs):
        super().__init__(**kwargs)
        self._events_path = events_path
        self._planned_steps = planned_steps
        self._last_step: dict[str, int] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if getattr(trial, "has_reported_at_least_once", False):
            self._replay(tune_controller, trial)

    def _replay(self, tune_controller, trial) -> None:
        """Record at each rung what a trial reported before the sweep was interrupted. `Tuner.restore` brings the
        scheduler back as it was before the first trial (Tune never saves its state): without this, the trials
        left to run would each meet empty rungs, and pass them, however badly they do (a diverged one included)."""
        stopped_at = {
            e["trial_id"]: e["step"] for e in jsonl.read(self._events_path) if e.get("event") == "early_stopped"
        }
        last = stopped_at.get(trial.trial_id)
        for result in _read_history(trial.storage.storage_filesystem, trial.path):
            if last is not None and result.get(self._time_attr, 0) > last:
                break  # what it reported while its stop was on its way: never judged
            super().on_trial_result(tune_controller, trial, self._finite(result))

    def _finite(self, result: dict) -> dict:
        value = result.get(self._metric)
        if isinstance(value, float) and not math.isfinite(value):
            return {**result, self._metric: WORST if self._mode == "min" else -WORST}
        return result

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        value = result.get(self._metric)
        result = self._finite(result)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get("step", 0) >= self._final_step(trial):
            return self.CONTINUE  # at its last step the trial is done anyway: let it save its adapter
        if action == self.STOP:
            jsonl.append(
                Path(self._events_path),
                {
                    "time": time.time(),
                    "trial_id": trial.trial_id,
                    "event": "early_stopped",
                    "step": result.get("step"),
                    self._metric: value,
                },
            )
            print(
                f"[raysft] ASHA stopped trial {trial.trial_id} at step {result.get('step')} ({self._metric} {value})",
                flush=True,
            )
        return action

    def _final_step(self, trial) -> int:
        if trial.trial_id not in self._last_step:
            self._last_step[trial.trial_id] = self._planned_steps(trial.config)
        return self._last_step[trial.trial_id]


class SparseMetricOptuna(OptunaSearch):
    """Optuna TPE when the metric arrives only on some results (eval intervals), not with every step."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            self._last_value = {**getattr(self, "_last_value", {}), trial_id: result[self.metric]}
            super().on_trial_result(
                trial_id, {**result, "training_iteration": result.get("step", result.get("training_iteration"))}
            )

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        last = getattr(self, "_last_value", {}).get(trial_id)
        if result is not None and self.metric not in result and last is not None:
            result = {**result, self.metric: last}
        super().on_trial_complete(trial_id, result, error)


class SweepEvents(Callback):
    """Appends a line to events.jsonl (and prints one) as each trial starts and ends."""

    def __init__(self, path: str):
        self.path = path

    def _event(self, trial, event: str, **extra) -> None:
        jsonl.append(Path(self.path), {"time": time.time(), "trial_id": trial.trial_id, "event": event, **extra})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._event(trial, "started", params={k: _jsonable(v) for k, v in trial.config.items()})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._event(trial, "ended")
        print(f"[raysft] trial {trial.trial_id} ended", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._event(trial, "error")
        print(f"[raysft] trial {trial.trial_id} failed (see {trial.path}/error.txt)", flush=True)


@contextlib.contextmanager
def _sparse_metrics() -> Iterator[None]:
    """Eval metrics arrive at eval intervals, not with every step: let Tune accept results without them."""
    old = os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TUNE_DISABLE_STRICT_METRIC_CHECKING", None)
        else:
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = old


# --- results --------------------------------------------------------------------------------------


def _collect(cfg: Config, plan: SweepPlan, folder: RunFolder, grid) -> SweepResult:
    """Results table, plots, the best adapter and config, from Tune's results and the trial folders; written into
    the driver's folder (`folder.local`, uploaded by the caller for a sweep folder on an object store)."""
    sweep_dir, local, options = folder.uri, folder.local, folder.options
    stopped = {e["trial_id"] for e in jsonl.read(local / EVENTS_FILE) if e.get("event") == "early_stopped"}
    # A trial that never reported (pending when a sweep was interrupted) has no Result.config.
    configs = {t.trial_id: t.config for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", [])}
    records = []
    for result in grid:
        trial_id = posixpath.basename(result.path)  # trial folders are named by trial id (_trial_dirname)
        run_dir = storage.join(sweep_dir, TRIALS_DIR, trial_id)
        trial_file = storage.join(run_dir, TRIAL_FILE)
        done = json.loads(storage.read_bytes(trial_file, options)) if storage.exists(trial_file, options) else None
        # ASHA's decision wins over a trial that raced to its end before the stop reached it.
        if result.error is not None:
            reason = f"{ERROR}: {str(result.error).strip().splitlines()[-1][:200]}"
        elif trial_id in stopped:
            reason = EARLY_STOPPED
        else:
            reason = COMPLETED if done is not None else INTERRUPTED
        history = _history(result)
        records.append(
            TrialRecord(
                trial_id=trial_id,
                params=trial_overrides(plan, result.config or configs.get(trial_id, {}), cfg),
                # generation eval refuses a run folder on an object store, so only a local one has gen_* lines
                history=history if folder.remote else with_generation(history, Path(run_dir)),
                wall_time_s=float(result.metrics.get("time_total_s", math.nan)),
                stop_reason=reason,
                run_dir=run_dir,
                adapter=(done or {}).get("adapter"),
            )
        )
    records.sort(key=lambda r: r.trial_id)
    table = [table_row(r, plan.metric, plan.mode) for r in records]
    write_csv(table, local / RESULTS_CSV)
    plot_loss_vs_lr(table, str(local / SWEEP_PLOTS[0]), defaults={"train.lr": cfg.train.lr, "lora.r": cfg.lora.r})
    plot_curves(records, str(local / SWEEP_PLOTS[1]), plan.keys)

    best = None
    row = pick_best(table, plan.metric, plan.mode)
    if row is not None:
        best_dir = local / BEST_ADAPTER
        shutil.rmtree(best_dir, ignore_errors=True)
        adapter = None
        if row["adapter"]:
            storage.copy_tree(row["adapter"], str(best_dir), options)  # from the trial's folder, local or remote
            adapter = storage.join(sweep_dir, BEST_ADAPTER)
        params = {k: v for k, v in row.items() if k in plan.keys}
        best_cfg = best_config(cfg, plan, params)
        (local / BEST_CONFIG).write_text(best_cfg.dump_yaml())
        best = BestTrial(trial_id=row["trial_id"], config=best_cfg.to_dict(), metrics=row, adapter=adapter)
    sweep = SweepResult(
        sweep_dir=sweep_dir,
        metric=plan.metric,
        mode=plan.mode,
        table=table,
        best=best,
        plots=[storage.join(sweep_dir, p) for p in SWEEP_PLOTS],
    )
    log.info(sweep.summary_line())
    return sweep


def _history(result) -> list[dict[str, Any]]:
    """Every result the trial reported, one per training step (a resumed trial repeats steps: keep the last).

    Read from the trial's result.json, where a metric that was not reported is absent and a diverged
    one is NaN (a dataframe cannot tell the two apart)."""
    return _read_history(result.filesystem, result.path)


def _read_history(fs, trial_path: str) -> list[dict[str, Any]]:
    """_history of the trial folder `trial_path` on `fs` (Tune's storage: a folder or an object store)."""
    path = f"{trial_path}/result.json"
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
    except FileNotFoundError:
        text = ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("step"), (int, float)):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def with_generation(history: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """The trial's Tune results with its gen_* values joined in by step, from its metrics.jsonl (train.eval_generate
    writes them there; Ray Train's validation results never reach Tune's per-step stream)."""
    gen = generation_history(run_dir)
    if not gen:
        return history
    rows = {int(r["step"]): dict(r) for r in history}
    for step, values in gen.items():
        rows.setdefault(step, {"step": step}).update(values)
    return [rows[s] for s in sorted(rows)]


def _jsonable(v: Any) -> Any:
    item = getattr(v, "item", None)
    return item() if callable(item) else v
