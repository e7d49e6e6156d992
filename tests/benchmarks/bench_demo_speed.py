"""Demo training speed: this tree's streaming shard reader vs the whole-table code it replaced, interleaved.

Issue 14's speed acceptance: demo tokens/s within 5% of the whole-table code (`--base-ref`, default
90fa469: main just before the merge that brought the streaming reader in, 440e892; the pair differs by
issue 14's changes and what main merged later, generation eval and formatting; 373693c, where the scale
branch started, also lacks the training branch). Both trees train the demo exactly as `raysft demo`
does (pipeline/demo/demo.yaml, SmolLM2-135M-Instruct NF4 from the local model cache, 2 CPU workers,
DeepSpeed ZeRO-2, `demo.run._train_on_local_ray`) on one set of generated task rows; the runs
alternate old/new (ABBA order, so drift hits both sides alike), each in a fresh process with its own
local Ray. Per run it records
  - tok/s: the median over steps 2.. of metrics.jsonl's tokens_per_s (the demo report's number: tokens of
    the step over its optimizer-step time);
  - s/step: the median wall interval between consecutive steps appearing in metrics.jsonl (polled every
    50 ms), which also counts reading the step's rows, reporting and checkpointing;
and prints the median of each per tree and the ratio new/old. The old tree is `git archive REF` unpacked
in the work folder (bench_memory.base_tree); each tree prepares its own data cache once (not timed).

    python tests/benchmarks/bench_demo_speed.py [--runs 3] [--steps 24] [--base-ref 90fa469]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_memory import REPO, base_tree, shim

DEMO_MODEL_DIR = Path.home() / ".cache" / "raysft" / "models" / "smollm2-135m-instruct"


# ------------------------------------------------------------------------------------------- child
def child(args) -> None:
    """One demo training run of the tree on PYTHONPATH; writes its per-step numbers to --out."""
    from raysft.pipeline.demo.run import _train_on_local_ray, demo_config

    tree_dir = Path(args.tree_dir)
    overrides = [f"train.max_steps={args.steps}", *(args.overrides or [])]
    cfg = demo_config(args.model, Path(args.data), tree_dir, args.run_name, overrides=overrides)
    metrics = tree_dir / args.run_name / "metrics.jsonl"
    seen: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            if metrics.is_file():
                now = time.perf_counter()
                for line in metrics.read_text().splitlines():
                    try:
                        step = json.loads(line).get("step")
                    except json.JSONDecodeError:
                        continue  # a line being written
                    if isinstance(step, int):
                        seen.setdefault(step, now)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    _train_on_local_ray(cfg)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    tok_s = [m["tokens_per_s"] for m in rows if "loss" in m and m["step"] >= 2]
    steps = sorted(seen)
    intervals = [seen[s] - seen[s - 1] for s in steps if s >= 2 and s - 1 in seen]
    out = {
        "tok_s": statistics.median(tok_s),
        "s_per_step": statistics.median(intervals),
        "steps": len(rows),
        "run_seconds": round(seconds, 1),
    }
    Path(args.out).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------ parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-ref", default="90fa469", help="git ref of the whole-table code to measure beside")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree (interleaved)")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run (the demo's 24)")
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR), help="the demo model folder (raysft models fetch)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "raysft-bench-demo-speed"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree-dir", help=argparse.SUPPRESS)
    ap.add_argument("--run-name", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="overrides", action="append", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"No demo model in {args.model}: run `raysft models fetch smollm2-135m-instruct` first.")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(shim(REPO)))
    from raysft.pipeline.demo.run import _rows_for, demo_config
    from raysft.pipeline.demo.task import write_task

    data = work / "data"
    probe = demo_config(args.model, data, work, "probe", [f"train.max_steps={args.steps}"])
    write_task(data, n_train=_rows_for(probe), n_eval=32, seed=probe.data.seed)  # the demo's rows, same for both

    trees = {"old": base_tree(args.base_ref, work), "new": REPO}
    stamp = time.strftime("%H%M%S")
    results: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.runs):
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            out = work / f"{name}-{stamp}-{i}.json"
            env = {**os.environ, "PYTHONPATH": str(shim(trees[name])), "HF_HUB_OFFLINE": "1"}
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--tree-dir",
                str(work / name),
                "--run-name",
                f"run-{stamp}-{i}",
                "--data",
                str(data),
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--out",
                str(out),
            ]
            proc = subprocess.run(cmd, env=env, cwd=str(work), text=True, capture_output=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} run {i} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(out.read_text()))
            print(f"run {i} {name}: {results[name][-1]}", flush=True)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "s_per_step")} for n, rs in results.items()}
    print("\n| code | runs | tok/s (median) | s/step (median) |\n| --- | --- | --- | --- |")
    for name, label in (("old", f"whole table ({args.base_ref})"), ("new", "streaming shards (this tree)")):
        print(f"| {label} | {len(results[name])} | {med[name]['tok_s']:.1f} | {med[name]['s_per_step']:.2f} |")
    tok = med["new"]["tok_s"] / med["old"]["tok_s"]
    step = med["old"]["s_per_step"] / med["new"]["s_per_step"]
    print(f"\nnew/old: tok/s x{tok:.3f}, steps per second x{step:.3f} (within 5%: {min(tok, step) >= 0.95})")


if __name__ == "__main__":
    main()
