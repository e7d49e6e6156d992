"""Peak memory of the driver and of each training worker at 1x and ~20x gsm8k, streaming vs whole-table.

For each code tree (this checkout's streaming reader, and `--base-ref`, the whole-table code it
replaced) and each size, one child process starts its own local Ray, trains `--steps` optimizer
steps with 2 workers on a tiny random Llama (fp32 LoRA, DeepSpeed ZeRO-2), and records
  - the driver's peak RSS (getrusage ru_maxrss),
  - each RayTrainWorker's peak RSS (VmHWM in /proc, polled every 0.2 s until it exits).
The data are generated packed rows of --seq-len tokens with gsm8k's token count (x1: --rows-x1 rows,
about 7.5k gsm8k samples of ~270 tokens) and --scale times that, written once as a sharded artifact
(data/shards.py, --shard-mb); the old code reads the same Parquet files (it ignores _index.json).

    python tests/benchmarks/bench_memory.py [--base-ref 373693c] [--steps 6] [--scale 20] [--shard-mb 16]
    python tests/benchmarks/bench_memory.py --only new-x20   # one cell (each takes 1-2 minutes here)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def generate(directory: Path, n_rows: int, seq_len: int, shard_mb: float, vocab: int, seed: int) -> None:
    """`n_rows` packed rows of `seq_len` tokens, ~4 samples each, half of each sample trained."""
    import numpy as np
    import pyarrow as pa

    from raysft.pipeline.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(str(directory), shard_mb=shard_mb, cache_key=f"bench-{n_rows}")
    sid = 0
    for start in range(0, n_rows, 1000):
        n = min(1000, n_rows - start)
        ids = rng.integers(10, vocab, size=(n, seq_len), dtype=np.int32)
        cuts = np.sort(rng.integers(1, seq_len, size=(n, 3)), axis=1)
        bounds = np.concatenate([np.zeros((n, 1), np.int64), cuts, np.full((n, 1), seq_len)], axis=1)
        lengths = np.diff(bounds, axis=1)
        lengths = np.where(lengths == 0, 0, lengths)
        pos = np.empty((n, seq_len), np.int32)
        labels = ids.copy()
        seq_lengths, source_ids = [], []
        for r in range(n):
            lens = [int(x) for x in lengths[r] if x > 0]
            p = np.concatenate([np.arange(x, dtype=np.int32) for x in lens])
            pos[r] = p
            labels[r][p < np.repeat(np.array(lens) // 2, lens)] = -100
            seq_lengths.append(lens)
            source_ids.append(list(range(sid, sid + len(lens))))
            sid += len(lens)
        offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32))
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel())),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.ravel())),
                "position_ids": pa.ListArray.from_arrays(offsets, pa.array(pos.ravel())),
                "seq_lengths": pa.array(seq_lengths, pa.list_(pa.int32())),
                "source_ids": pa.array(source_ids, pa.list_(pa.int64())),
            }
        )
        writer.write(table)
    writer.close()


def shim(tree: Path) -> Path:
    """A folder with raysft/{pipeline,kernels} pointing into `tree` (what PYTHONPATH names)."""
    d = tree / ".bench-shim" / "raysft"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "kernels"):
        link = d / name
        if link.is_symlink() and os.readlink(link) != str(tree / name):  # a copied or moved tree's old link
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(tree / name)
    return d.parent


def base_tree(ref: str, root: Path) -> Path:
    tree = root / f"base-{ref}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "pipeline", "kernels"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# ------------------------------------------------------------------------------------------- child
def child(args) -> None:
    import psutil
    import ray

    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            for p in me.children(recursive=True):
                try:
                    if "RayTrainWorker" not in " ".join(p.cmdline()):
                        continue
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peaks[p.pid] = max(peaks.get(p.pid, 0), int(line.split()[1]) * 1024)
                except (psutil.Error, OSError):
                    pass
            time.sleep(0.2)

    from raysft.pipeline.config import load_config
    from raysft.pipeline.trainer import build_trainer, finish_run, preflight

    @__import__("dataclasses").dataclass
    class Prepared:
        train_dir: Path
        eval_dir: object = None
        stats: dict = None
        key: str = "bench"

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = preflight(
        load_config(
            None,
            {
                "model.name_or_path": args.model,
                "model.quantization": "none",
                "model.dtype": "float32",
                "model.gradient_checkpointing": False,
                "lora.r": 4,
                "lora.alpha": 8,
                "train.max_steps": args.steps,
                "train.save_every": args.steps,
                "train.eval_every": 10**6,
                "train.logging.tensorboard": False,
                "scaling.num_workers": 2,
                "run.storage_path": args.runs,
                "run.name": "bench",
                "run.max_failures": 0,
            },
        )
    )
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    finish_run(cfg, build_trainer(cfg, Prepared(Path(args.data))).fit())
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    ray.shutdown()
    result = {
        "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_rss": sorted(peaks.values()),
        "seconds": round(seconds, 1),
    }
    Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-ref", default="373693c", help="git ref of the whole-table code to measure beside")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--rows-x1", type=int, default=2000, help="packed rows of gsm8k x1 (~2M tokens at 1024)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--shard-mb", type=float, default=16)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "raysft-bench-memory"))
    ap.add_argument("--only", default="", help="comma-separated cells: new-x1,new-x20,old-x1,old-x20")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(REPO / "tests"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from tiny import save_tiny_model

    model = work / "model"
    if not (model / "config.json").exists():
        save_tiny_model(model, "chatml")
    sizes = {"x1": args.rows_x1, f"x{args.scale}": args.rows_x1 * args.scale}
    for name, rows in sizes.items():
        data = work / f"data-{name}-{args.shard_mb:g}mb"
        if not (data / "_index.json").exists():
            generate(data, rows, args.seq_len, args.shard_mb, vocab=500, seed=0)
    trees = {"new": REPO, "old": base_tree(args.base_ref, work)}
    cells = [c for c in args.only.split(",") if c] or [f"{t}-{s}" for s in sizes for t in trees]
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for cell in cells:
        tree, size = cell.split("-")
        out = work / f"{cell}.json"
        env = {
            **os.environ,
            "PYTHONPATH": str(shim(trees[tree])),
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "OMP_NUM_THREADS": "1",
            "RAY_DEDUP_LOGS": "0",
        }
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            str(model),
            "--data",
            str(work / f"data-{size}-{args.shard_mb:g}mb"),
            "--runs",
            str(work / f"runs-{cell}"),
            "--steps",
            str(args.steps),
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, cwd=str(work), text=True, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"{cell} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[cell] = json.loads(out.read_text())
        results_file.write_text(json.dumps(results, indent=1))
        print(cell, results[cell], flush=True)
    mib = lambda b: f"{b / (1 << 20):.0f}"  # noqa: E731
    print("\n| code | data | packed rows | driver peak RSS (MiB) | worker peak RSS (MiB) | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cell, r in sorted(results.items()):
        tree, size = cell.split("-")
        print(
            f"| {'streaming (this tree)' if tree == 'new' else 'whole table (' + args.base_ref + ')'} | "
            f"gsm8k {size} | {sizes.get(size, '?')} | {mib(r['driver_peak_rss'])} | "
            f"{' / '.join(mib(x) for x in r['worker_peak_rss'])} | "
            f"{r['seconds']} |"
        )


if __name__ == "__main__":
    main()
