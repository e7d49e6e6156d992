"""Seconds a training step waits for Ray Train's controller poll: the same tiny run at 4 and at 24 steps.

    python tests/benchmarks/bench_report_wait.py [--python PYTHON] [--poll 1] [--repeat 3]

Ray Train takes a worker's reports from a queue of one, one per controller poll
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; raysft sets 1 s). A run that reported every step could not go faster than
one step per poll, whatever the hardware. This runs `raysft train` (1 worker, a tiny random Llama from
tests/tiny.py, quantization none, float32, one checkpoint at the end) for 4 and for 24 steps, one after the
other, and prints the extra wall seconds per extra step (median over --repeat pairs) beside the steps'
own compute time (tokens / tokens_per_s of metrics.jsonl). --python picks the interpreter (another
checkout's venv for a before/after).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def setup(root: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    import tiny
    import yaml

    model = root / "model"
    model.mkdir()
    tiny.save_tiny_model(model, "chatml")
    rng = random.Random(0)
    with (root / "chat.jsonl").open("w") as f:
        for _ in range(40):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            turns = [{"role": "user", "content": f"what is {a} plus {b}"}]
            turns.append({"role": "assistant", "content": f"the answer is {a + b}"})
            f.write(json.dumps({"messages": turns}) + "\n")
    cfg = {
        "model": {"name_or_path": str(model), "quantization": "none", "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(root / "chat.jsonl"), "max_seq_len": 128, "cache_dir": str(root / "cache")},
        "train": {"save_every": 1000, "eval_every": 1000, "lr": 1e-3, "warmup_steps": 0},
        "scaling": {"num_workers": 1},
        "run": {"storage_path": str(root / "runs"), "max_failures": 0},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(python: str, cfg: Path, name: str, steps: int, poll: str) -> tuple[float, float]:
    """Wall seconds of `raysft train` and the steps' own compute seconds."""
    import os

    env = dict(os.environ, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=poll)
    args = [python, "-m", "raysft.pipeline.cli", "train", str(cfg), "--set", f"run.name={name}"]
    args += ["--set", f"train.max_steps={steps}"]
    start = time.monotonic()
    subprocess.run(args, check=True, capture_output=True, env=env, cwd=cfg.parent)
    wall = time.monotonic() - start
    rows = [json.loads(x) for x in (cfg.parent / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    compute = sum(r["trained_tokens"] / r["tokens_per_s"] for r in rows[:1])
    compute += sum((b["trained_tokens"] - a["trained_tokens"]) / b["tokens_per_s"] for a, b in zip(rows, rows[1:]))
    return wall, compute


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--poll", default="1")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_report_wait_"))
    cfg = setup(root)
    run(a.python, cfg, "warm", 2, a.poll)  # the prepared data and the tokenizer spec cached
    per_step, compute = [], []
    for i in range(a.repeat):
        short, _ = run(a.python, cfg, f"s{i}", 4, a.poll)
        long, c = run(a.python, cfg, f"l{i}", 24, a.poll)
        per_step.append((long - short) / 20)
        compute.append(c / 24)
        print(json.dumps({"pair": i, "wall_4": round(short, 1), "wall_24": round(long, 1)}), flush=True)
    print(
        f"poll {a.poll} s: {statistics.median(per_step):.3f} s of wall per extra step (median of {a.repeat}), "
        f"{statistics.median(compute) * 1000:.1f} ms of compute per step"
    )


if __name__ == "__main__":
    main()
