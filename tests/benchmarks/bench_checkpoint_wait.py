"""How long does a training step wait on its checkpoint? `train.checkpoint_upload` sync vs async, with
run.storage_path on the local disk and on an S3-compatible server (moto's, on 127.0.0.1, in this process).

One Ray Train worker (1 CPU, `ray.init(num_cpus=2)`) trains a small random Llama (--hidden/--layers, LoRA
rank --lora-r, so the checkpoint is a few MiB: LoRA weights, the adapter, AdamW state) and checkpoints every
--every steps. The loop itself records, per checkpoint, in events.jsonl: `write_s` (gather + write + seal the
local folder) and `report_s` (ray.train.report: with sync, the upload; with async, only handing it over).
The wait is write_s + report_s. Also reported: the median step interval (metrics.jsonl lines, stamped by
a driver thread) of plain steps and of the steps right after a checkpoint, where a background upload
competes for the CPU.

    python tests/benchmarks/bench_checkpoint_wait.py [--steps 24] [--every 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate_eval import LineClock, write_data, write_model  # noqa: E402


def one_run(args, model_dir: Path, prepared, storage: str, endpoint: str | None, upload: str, name: str) -> dict:
    from raysft.pipeline import ray_runtime
    from raysft.pipeline import storage as st
    from raysft.pipeline.config import load_config
    from raysft.pipeline.trainer import build_trainer, finish_run, preflight

    over = {
        "model.name_or_path": str(model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "lora.r": args.lora_r,
        "lora.alpha": 2 * args.lora_r,
        "lora.dropout": 0.0,
        "train.max_steps": args.steps,
        "train.save_every": args.every,
        "train.eval_every": 10**6,
        "train.keep_checkpoints": 2,
        "train.checkpoint_upload": upload,
        "train.logging.tensorboard": False,
        "train.warmup_steps": 0,
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 1,
        "run.storage_path": storage,
        "run.name": name,
        "run.max_failures": 0,
    }
    if endpoint:
        over["storage.endpoint_url"] = endpoint
    cfg = preflight(load_config(overrides=over))
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ})
    ray_runtime.start("local", ray_runtime.Needs(dashboard=True, log_to_driver=False), num_cpus=2, env=env)
    remote = st.is_remote(storage)
    local_run = Path(tempfile.mkdtemp(prefix="bench-ckpt-run-")) if remote else Path(storage) / name
    clock = LineClock(local_run / "metrics.jsonl")
    if not remote:
        clock.start()
    try:
        t0 = time.monotonic()
        result = finish_run(cfg, build_trainer(cfg, prepared).fit())
        wall = time.monotonic() - t0
    finally:
        clock.stop.set()
        if clock.is_alive():
            clock.join()
        ray_runtime.stop()
    run_uri = str(result.run_dir)
    if remote:
        st.download(st.join(run_uri, "events.jsonl"), local_run / "events.jsonl", st.StorageOptions.of(cfg))
    events = [json.loads(x) for x in (local_run / "events.jsonl").read_text().splitlines()]
    ck = [e for e in events if e.get("event") == "checkpoint" and e["step"] > args.warmup]
    med = statistics.median
    out = {
        "storage": "s3 (moto)" if remote else "local disk",
        "upload": upload,
        "checkpoints": len(ck),
        "write_s": med(e["write_s"] for e in ck),
        "report_s": med(e["report_s"] for e in ck),
        "wait_s": med(e["write_s"] + e["report_s"] for e in ck),
        "wall_s": round(wall, 1),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
    }
    if not remote:
        stamps = clock.stamps
        iv = {s: stamps[s] - stamps[s - 1] for s in stamps if s - 1 in stamps and s > args.warmup}
        out["step_s"] = med(v for s, v in iv.items() if (s - 1) % args.every != 0)
        out["step_after_ckpt_s"] = med(v for s, v in iv.items() if (s - 1) % args.every == 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the four runs")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--lora-r", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1").create_dir("bench")
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    model_dir = write_model(root / "model", args.hidden, args.layers)
    prepared, _ = write_data(root, args.seq_len, n_rows=args.steps, n_prompts=0)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.steps} steps, checkpoint every {args.every}, "
        f"LoRA r={args.lora_r} on hidden {args.hidden} x {args.layers} layers"
    )
    results = []
    try:
        for i in range(args.repeats):
            for where in ("local", "s3"):
                for upload in ("sync", "async"):
                    storage = str(root / f"runs{i}") if where == "local" else f"s3://bench/runs{i}"
                    r = one_run(args, model_dir, prepared, storage, endpoint if where == "s3" else None, upload, upload)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        server.stop()
    med = statistics.median
    print("| storage | upload | checkpoints | write s | report s | wait s (median) | wait vs sync |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for where in ("local disk", "s3 (moto)"):
        sync = med(r["wait_s"] for r in results if r["storage"] == where and r["upload"] == "sync")
        for upload in ("sync", "async"):
            rs = [r for r in results if r["storage"] == where and r["upload"] == upload]
            wait = med(r["wait_s"] for r in rs)
            print(
                f"| {where} | {upload} | {sum(r['checkpoints'] for r in rs)} | {med(r['write_s'] for r in rs):.3f} | "
                f"{med(r['report_s'] for r in rs):.3f} | {wait:.3f} | {wait / sync:.2f}x |"
            )


if __name__ == "__main__":
    main()
