"""How long does a training step wait on its checkpoint? `train.checkpoint_upload` sync vs async, with
run.storage_path on the local disk and on an S3-compatible server (moto's, on 127.0.0.1, in this process).

One Ray Train worker (1 CPU, `ray.init(num_cpus=2)`) trains a small random Llama (--hidden/--layers, LoRA
rank --lora-r, so the checkpoint is a few MiB: LoRA weights, the adapter, AdamW state) and checkpoints every
--every steps. The loop itself records, per checkpoint, in events.jsonl: `write_s` (gather + write + seal the
local folder) and `report_s` (ray.train.report: with sync, the upload; with async, only handing it over).
The wait per checkpoint is measured from outside: a driver thread stamps each metrics.jsonl line as it
appears (for an s3:// run, rank 0's staged copy); step c's checkpoint and report fall between lines c and
c+1, and an upload still running holds up the report after step c+1, so wait = the two intervals after a
checkpoint minus two plain intervals (median over checkpoints). It includes the upload thread's
competition for the CPU.

    python tests/benchmarks/bench_checkpoint_wait.py [--steps 40] [--every 4] [--repeats 1]
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


class StagedClock(LineClock):
    """A LineClock on the metrics.jsonl of a run staged by rank 0 (s3:// run folder): the newest
    raysft-run-*/ folder in the temp dir created after `since`."""

    def __init__(self, since: float):
        super().__init__(Path("/nonexistent"))
        self.since = since

    def run(self) -> None:
        while not self.stop.is_set() and not self.path.is_file():
            found = [p for p in Path(tempfile.gettempdir()).glob("raysft-run-*") if p.stat().st_mtime >= self.since]
            if found:
                self.path = max(found, key=lambda p: p.stat().st_mtime) / "metrics.jsonl"
            time.sleep(0.005)
        super().run()


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
    clock = StagedClock(time.time() - 1) if remote else LineClock(Path(storage) / name / "metrics.jsonl")
    clock.start()
    try:
        t0 = time.monotonic()
        result = finish_run(cfg, build_trainer(cfg, prepared).fit())
        wall = time.monotonic() - t0
    finally:
        clock.stop.set()
        clock.join()
        ray_runtime.stop()
    events_file = Path(tempfile.mkdtemp(prefix="bench-ckpt-events-")) / "events.jsonl"
    st.download(st.join(str(result.run_dir), "events.jsonl"), events_file, st.StorageOptions.of(cfg))
    events = [json.loads(x) for x in events_file.read_text().splitlines()]
    ck = [e for e in events if e.get("event") == "checkpoint" and args.warmup < e["step"] < args.steps]
    stamps, med = clock.stamps, statistics.median
    iv = {s: stamps[s] - stamps[s - 1] for s in stamps if s - 1 in stamps and s > args.warmup}
    # Step c's checkpoint and report run between metrics lines c and c+1; an upload still running holds up
    # the report after step c+1 (lines c+1 -> c+2). A plain interval has no checkpoint in its last two steps.
    plain = med(v for s, v in iv.items() if (s - 1) % args.every and (s - 2) % args.every)
    extra = [iv[e["step"] + 1] + iv[e["step"] + 2] - 2 * plain for e in ck if e["step"] + 2 in iv]
    size = sum(
        f.stat().st_size for f in (Path(storage) / name / f"checkpoint_{args.steps:06d}").rglob("*") if f.is_file()
    )
    return {
        "storage": "s3 (moto)" if remote else "local disk",
        "upload": upload,
        "checkpoints": len(ck),
        "checkpoint_mib": round(size / 2**20, 2) if not remote else None,
        "write_s": med(e["write_s"] for e in ck),
        "report_s": med(e["report_s"] for e in ck),
        "plain_step_s": plain,
        "wait_s": med(extra),
        "wall_s": round(wall, 1),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=4)
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
    pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
    ).create_dir("bench")
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
    print("| storage | upload | checkpoints | plain step s | write s | report s | wait s (median) | wait vs sync |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for where in ("local disk", "s3 (moto)"):
        sync = med(r["wait_s"] for r in results if r["storage"] == where and r["upload"] == "sync")
        for upload in ("sync", "async"):
            rs = [r for r in results if r["storage"] == where and r["upload"] == upload]
            wait = med(r["wait_s"] for r in rs)
            print(
                f"| {where} | {upload} | {sum(r['checkpoints'] for r in rs)} | "
                f"{med(r['plain_step_s'] for r in rs):.3f} | "
                f"{med(r['write_s'] for r in rs):.3f} | "
                f"{med(r['report_s'] for r in rs):.3f} | {wait:.3f} | {wait / sync:.2f}x |"
            )


if __name__ == "__main__":
    main()
