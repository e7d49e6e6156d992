"""What the driver shows while a run trains, and where everything else goes.

`console_session(log_path, verbose)` routes the process's stdout and stderr at the file-descriptor
level (Python, C++ and subprocess output alike: Ray, Ray Train, Ray Data, DeepSpeed, forwarded
worker logs) into `log_path` in the run folder, complete; with `verbose` it also goes to the
terminal. The `Console` it yields writes to the real terminal: the plan, one progress line (or a
tqdm bar on a TTY) per optimizer step with loss, lr, tokens/s, ETA and the last eval, checkpoints
as they are saved, one sentence per recovery, and the final summary.

`raysft prepare` gets the same routing (its log under DATA.CACHE_DIR/logs/) with `PrepareConsole` on stderr:
stage lines, the data plan's rows as a bar on a terminal, the per-source summary.

`RunFollower` produces those lines by following the run folder the workers write (metrics.jsonl,
events.jsonl, failures.jsonl, checkpoint_* folders) from a driver thread, so the training loop needs no console code.
A run folder on an object store is followed the same way through pyarrow.fs: one listing per poll (every
REMOTE_POLL_S) and a ranged read of each file that grew (rank 0 publishes its files every few seconds,
run_folder.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ray.train import UserCallback

from raysft.pipeline import storage
from raysft.pipeline.run_folder import EVENTS_FILE, FAILURES_FILE, LOG_FILE, METRICS_FILE, run_dir_of

REMOTE_POLL_S = 2.0  # how often the console lists a run folder on an object store (local folders: 0.5 s)
_CKPT = re.compile(r"checkpoint_(\d+)$")


class Console:
    """Human-facing lines; a tqdm bar per run on a terminal, plain lines elsewhere (CI, Ray Jobs logs)."""

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.bar_enabled = self.stream.isatty() if bar is None else bar
        self._bar = None

    def line(self, text: str = "") -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(
        self,
        m: dict[str, Any],
        total: int | None,
        eta_s: float | None,
        last_eval: tuple[int, float] | None,
    ) -> None:
        """One optimizer step: step/total, loss, lr, tokens/s, ETA and the last eval loss."""
        fields = f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m.get('tokens_per_s', 0):.0f} tok/s"
        evals = f"  eval_loss {last_eval[1]:.4f} @{last_eval[0]}" if last_eval else ""
        if self.bar_enabled:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total,
                    initial=int(m["step"]) - 1,
                    file=self.stream,
                    unit="step",
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}]{postfix}",
                )
            self._bar.set_postfix_str(fields + evals, refresh=False)
            self._bar.update(int(m["step"]) - self._bar.n)
            return
        of = f"/{total}" if total else ""
        self.line(f"  step {m['step']}{of}  {fields}  ETA {format_eta(eta_s)}{evals}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class RunFollower:
    """Turns what a run writes into its folder (a local path or an s3:// / gs:// URI) into console lines;
    `poll()` handles what is new."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        console: Console,
        log_file: str | os.PathLike | None = None,
        options: storage.StorageOptions | None = None,
    ):
        self.remote = storage.is_remote(str(run_dir))
        self.run_dir: Path | str = str(run_dir) if self.remote else Path(run_dir)
        self.log_file = log_file if log_file is not None else storage.join(self.run_dir, LOG_FILE)
        self._fs, self._path = storage.resolve(str(run_dir), options) if self.remote else (None, "")
        self.console = console
        self._offsets: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._seen_ckpts: set[str] = set(self._checkpoints())  # a resumed run's old ones
        self.total: int | None = None
        self.last_step = 0
        self.last_eval: tuple[int, float] | None = None
        self.starts = 0
        self._failure: str | None = None
        self._t0: float | None = None
        self._step0 = 0
        self._replay_until = 0  # after a restart, metrics.jsonl is read again from its start up to here
        self.final: dict[str, Any] = {}

    def _list(self) -> None:
        """Remote: one listing of the run folder per poll (file sizes, checkpoint folders)."""
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True))
        self._sizes = {posixpath.basename(i.path): (i.size or 0) for i in infos if i.type == pafs.FileType.File}
        self._dirs = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)

    def _checkpoints(self) -> list[str]:
        if not self.remote:
            return sorted(p.name for p in self.run_dir.glob("checkpoint_*"))
        try:
            self._list()
        except (OSError, ValueError):
            return []
        return [d for d in self._dirs if d.startswith("checkpoint_")]

    def _read_from(self, name: str) -> bytes:
        """What `name` holds past what was already read (b'' when it does not exist)."""
        offset = self._offsets.get(name, 0)
        if self.remote:
            size = self._sizes.get(name, 0)
            if size <= offset:
                return b""
            with self._fs.open_input_file(f"{self._path}/{name}") as f:
                return f.read_at(size - offset, offset)  # a ranged GET of the new bytes only
        path = self.run_dir / name
        if not path.is_file():
            return b""
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()

    def _new_lines(self, name: str) -> list[dict[str, Any]]:
        data = self._read_from(name)
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self._offsets[name] = self._offsets.get(name, 0) + end
        return [json.loads(x) for x in data[:end].decode().splitlines() if x.strip()]

    def poll(self) -> None:
        ckpts = self._checkpoints()  # remote: also the listing the reads below use
        for e in self._new_lines(FAILURES_FILE) + self._new_lines(EVENTS_FILE):  # a failure precedes its restart
            self._event(e)
        for m in self._new_lines(METRICS_FILE):
            self._metrics(m)
        for name in ckpts:
            if name not in self._seen_ckpts and _CKPT.search(name):
                self._seen_ckpts.add(name)
                where = storage.join(self.run_dir, name)
                self.console.line(f"  checkpoint saved: step {int(_CKPT.search(name).group(1))} -> {where}")

    def _event(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        if kind == "worker_failure":
            self._failure = e.get("what") or "a worker failed"
        elif kind == "start":
            self.total = e.get("total_steps", self.total)
            self.starts += 1
            step = int(e.get("step", 0))
            if self.starts == 1:
                where = f" from step {step}" if step else ""
                self.console.line(
                    f"  training {self.total} steps on {e.get('world_size')} worker(s){where} "
                    f"(ZeRO-{e.get('zero_stage')}); progress below, full log in {self.log_file}"
                )
            else:
                # The restarted group rewound metrics.jsonl to its checkpoint (a new, shorter file): read it
                # again from the top, skipping what was shown up to the step it resumed from.
                self._offsets[METRICS_FILE], self._replay_until = 0, step
                what = self._failure or "the worker group stopped"
                self.console.line(
                    f"  recovered: {what} at step {self.last_step}; resumed from step {step} "
                    f"on {e.get('world_size')} worker(s)."
                )
                self._failure = None
            self._t0, self._step0 = (
                float(e.get("time", time.time())),
                step,
            )  # the loop starts timing here
        elif kind == "preemption":
            self.console.line(
                f"  preemption notice ({e.get('reason')}) at step {e.get('step')}: "
                "checkpointing at every step until the group is replaced."
            )
        elif kind == "tracking_lost":
            self.console.line(
                f"  warning: {e.get('sink')} tracking stopped at step {e.get('step')} "
                f"({e.get('error')}); training goes on."
            )

    def _metrics(self, m: dict[str, Any]) -> None:
        gen = {k: v for k, v in m.items() if k.startswith("gen_") and isinstance(v, (int, float))}
        if gen and "step" in m:  # a generation eval's line (training/generate_eval.py), written when it finishes
            values = ", ".join(f"{k} {v:.4f}" for k, v in gen.items())
            self.console.line(f"  generation eval of step {m['step']}: {values}")
        if "loss" not in m or "step" not in m or int(m["step"]) <= self._replay_until:
            return
        step = int(m["step"])
        now = time.time()
        if self._t0 is None:  # no start event seen (an older run folder): time from this step on
            self._t0, self._step0 = now, step
        rate = (now - self._t0) / (step - self._step0) if step > self._step0 else None
        eta = rate * (self.total - step) if rate is not None and self.total else None
        if isinstance(m.get("eval_loss"), (int, float)):
            self.last_eval = (step, float(m["eval_loss"]))
        self.last_step = step
        self.final = m
        self.console.progress(m, self.total, eta, self.last_eval)


class WorkerFailures(UserCallback):
    """Ray Train callback (it runs in the controller, on the driver's node): one failures.jsonl line per
    worker-group failure, naming the rank, its node and the error, for the console's recovery sentence
    (in a run folder on an object store, the object is rewritten with the line added)."""

    def __init__(self, run_dir: str, options: storage.StorageOptions | None = None):
        self.run_dir, self.options = run_dir, options

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        parts = []
        for rank, exc in sorted(worker_exceptions.items()):
            ip = re.search(r"\bip:? ?(\d+\.\d+\.\d+\.\d+)", str(exc))
            where = f" on node {ip.group(1)}" if ip else ""
            parts.append(f"worker rank {rank}{where} lost ({type(exc).__name__})")
        line = json.dumps({"time": time.time(), "event": "worker_failure", "what": "; ".join(parts)}) + "\n"
        with contextlib.suppress(OSError, storage.StorageError):
            storage.append_bytes(storage.join(self.run_dir, FAILURES_FILE), line.encode(), self.options)


@contextlib.contextmanager
def follow_run(
    run_dir: str | os.PathLike,
    console: Console,
    interval_s: float | None = None,
    log_file: str | os.PathLike | None = None,
    options: storage.StorageOptions | None = None,
) -> Iterator[RunFollower]:
    """Follow `run_dir` (a folder, or a URI polled every REMOTE_POLL_S) from a background thread while the body
    runs (e.g. trainer.fit())."""
    follower = RunFollower(run_dir, console, log_file, options)
    if interval_s is None:
        interval_s = REMOTE_POLL_S if follower.remote else 0.5
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(Exception):  # a half-written file is read again next time
                follower.poll()

    thread = threading.Thread(target=loop, name="raysft-console", daemon=True)
    thread.start()
    try:
        yield follower
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            follower.poll()
        console.close()


@contextlib.contextmanager
def console_session(log_path: str | os.PathLike, verbose: bool = False, on_stderr: bool = False) -> Iterator[Console]:
    """Send fd 1 and fd 2 to `log_path` (and, with `verbose`, on to the terminal); yield a Console on the terminal
    (its stdout; with `on_stderr` its stderr, so that stdout stays for the command's machine-readable result).

    A pump thread copies the pipe to the log; if a child process (one Ray started) still holds the
    pipe when the session ends, the thread lives on to keep draining it for that child."""
    log_path = Path(log_path)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    term = open(os.dup(saved_err if on_stderr else saved_out), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    read_fd, write_fd = os.pipe()
    echo = os.dup(saved_err)

    def pump() -> None:
        # The log (and the run folder) is created by the first byte, so a run refused before it
        # prints anything leaves its folder untouched; if it cannot be written, output stays visible.
        log = None
        while chunk := os.read(read_fd, 1 << 16):
            if log is None:
                try:
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    log = open(log_path, "ab")  # noqa: SIM115 - closed at end of input
                except OSError:
                    log = False
            if log:
                log.write(chunk)
                log.flush()
            if verbose or not log:
                os.write(echo, chunk)
        if log:
            log.close()

    pumping = threading.Thread(target=pump, name="raysft-log", daemon=True)
    pumping.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    console = Console(term)
    try:
        yield console
    finally:
        console.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        term.close()
        pumping.join(timeout=2.0)  # drains the rest unless a child process still holds the pipe open


class PrepareConsole:
    """`raysft prepare`'s console: stage lines, the rows read (a bar on a terminal, a line every 10 s elsewhere),
    then the per-source summary; `__call__` is the data plan's progress report (`plan.reporting`)."""

    STAGES = 3
    LINE_EVERY_S = 10.0

    def __init__(self, console: Console, inputs: str = ""):
        self.console = console
        self.inputs = inputs  # what stage 1 names (data, tokenizer, destination), once the inputs are resolved
        self.t0 = time.perf_counter()
        self.ran = False  # the plan ran (else the prepared data came from the cache)
        self.resolved = False
        self._bar = None
        self._last_line = self.t0

    def stage(self, n: int, text: str) -> None:
        self._close_bar()
        self.console.line(f"[prepare {time.perf_counter() - self.t0:5.0f}s] {n}/{self.STAGES} {text}")

    def __call__(self, event: str, **info: Any) -> None:
        if event == "inputs" and not self.resolved:  # not before: a bad input is one sentence, alone
            self.resolved = True
            self.stage(1, f"{self.inputs}: {info['files']} file(s), cache key {info['key']}".lstrip(": "))
        elif event == "run":
            self.ran = True
            self.stage(
                2,
                f"tokenizing and packing {info['files']} file(s) with {info['actors']} tokenizer actor(s)",
            )
        elif event == "batch":
            self._rows(info["rows"], info["tokens"])
        elif event == "written":
            self._close_bar()

    def _rows(self, rows: int, tokens: int) -> None:
        if self.console.bar_enabled:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(file=self.console.stream, unit=" rows", dynamic_ncols=True)
            self._bar.set_postfix_str(f"{tokens} tokens", refresh=False)
            self._bar.update(rows - self._bar.n)
        elif time.perf_counter() - self._last_line >= self.LINE_EVERY_S:
            self._last_line = time.perf_counter()
            self.console.line(f"  {rows} rows, {tokens} tokens")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def log_plan(console: Console, cfg) -> None:
    """The plan line: model, data, workers, steps."""
    steps = cfg.train.max_steps if cfg.train.max_steps is not None else f"{cfg.train.epochs} epoch(s)"
    console.line(
        f"raysft: {cfg.run.name}: model {cfg.model.name_or_path} ({cfg.model.quantization}), "
        f"data {cfg.data.train}, {cfg.scaling.num_workers} worker(s), {steps} steps"
    )
    from raysft.pipeline.models import precision  # imports torch: only once the plan is said

    said = precision.describe(cfg)
    if said:
        console.line(f"raysft: {said}")


def summary_lines(result, seconds: float) -> list[str]:
    m = result.metrics or {}
    parts = [f"{m.get('step', '?')} steps in {seconds:.0f} s"]
    for key in ("loss", "eval_loss"):
        if isinstance(m.get(key), (int, float)):
            parts.append(f"{key} {m[key]:.4f}")
    return [
        f"done: {', '.join(parts)}",
        f"  adapter  {result.adapter_path}",
        f"  run      {result.run_dir}",
    ]


def run_with_console(cfg, fn, *, console: Console, log_file: Path) -> Any:
    """Run `fn()` (a training call for `cfg`) while following its run folder on `console`."""
    t0 = time.perf_counter()
    with follow_run(run_dir_of(cfg), console, log_file=log_file, options=storage.StorageOptions.of(cfg)):
        result = fn()
    for line in summary_lines(result, time.perf_counter() - t0):
        console.line(line)
    console.line(f"  log      {log_file}")
    return result
