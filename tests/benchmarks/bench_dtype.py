"""Demo training speed by dtype on this CPU: `auto`, forced bfloat16 and float32, in one run (issue 19).

Each variant trains the demo exactly as `raysft demo` does (bench_demo_speed's child: pipeline/demo/demo.yaml,
SmolLM2-135M-Instruct NF4, 2 CPU workers, DeepSpeed ZeRO-2) on one set of generated task rows, in a fresh process
with its own local Ray; the variants alternate (ABBA over --runs). Per run: tok/s is the median over steps 2.. of
metrics.jsonl's tokens_per_s, s/step the median interval between steps. bfloat16 on a CPU without native bf16
takes minutes per step, so it runs --bf16-steps steps (at least 3: its median skips step 1).

    python tests/benchmarks/bench_dtype.py [--runs 1] [--steps 6] [--bf16-steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_demo_speed import DEMO_MODEL_DIR
from bench_memory import REPO, shim

VARIANTS = {
    "auto": [],
    "float32": ["model.dtype=float32", "model.compute_dtype=float32"],
    "bfloat16": ["model.dtype=bfloat16", "model.compute_dtype=bfloat16"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bf16-steps", type=int, default=3)
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "raysft-bench-dtype"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(shim(REPO)))
    from raysft.pipeline.demo.run import _rows_for, demo_config
    from raysft.pipeline.demo.task import write_task
    from raysft.pipeline.models.precision import cpu_bf16_native, cpu_name

    print(f"CPU: {cpu_name()}; native bf16: {cpu_bf16_native()}", flush=True)
    data = work / "data"
    probe = demo_config(args.model, data, work, "probe", [f"train.max_steps={args.steps}"])
    write_task(data, n_train=_rows_for(probe), n_eval=32, seed=probe.data.seed)
    stamp = time.strftime("%H%M%S")
    results: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    order = list(VARIANTS)
    for i in range(args.runs):
        for name in order if i % 2 == 0 else order[::-1]:
            steps = args.bf16_steps if name == "bfloat16" else args.steps
            out = work / f"{name}-{stamp}-{i}.json"
            cmd = [sys.executable, str(REPO / "tests" / "benchmarks" / "bench_demo_speed.py"), "--child"]
            cmd += ["--tree-dir", str(work / "runs"), "--run-name", f"{name}-{stamp}-{i}", "--data", str(data)]
            cmd += ["--model", args.model, "--steps", str(steps), "--out", str(out)]
            for o in VARIANTS[name]:
                cmd += ["--set", o]
            env = {**os.environ, "PYTHONPATH": str(shim(REPO)), "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, env=env, cwd=str(work), text=True, capture_output=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} run {i} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(out.read_text()))
            print(f"run {i} {name}: {results[name][-1]}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "s_per_step")} for n, rs in results.items()}
    print("\n| dtype | runs | tok/s (median) | s/step (median) | tok/s vs float32 |\n| --- | --- | --- | --- | --- |")
    for name in VARIANTS:
        m, ratio = med[name], med[name]["tok_s"] / med["float32"]["tok_s"]
        print(f"| {name} | {len(results[name])} | {m['tok_s']:.1f} | {m['s_per_step']:.2f} | x{ratio:.2f} |")
    print(f"\nauto within 0.9x of float32: {med['auto']['tok_s'] / med['float32']['tok_s'] >= 0.9}")


if __name__ == "__main__":
    main()
