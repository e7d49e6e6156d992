"""Object storage against a real S3-compatible server (moto's standalone server on 127.0.0.1): shards and
the index on s3://, prepare with its input and its cache on s3://, and one sentence naming the URI for an
unreachable endpoint, a missing bucket, missing credentials, and a missing or truncated shard."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from train_fixtures import make_sample, pack_rows, write_shards

from raysft.pipeline import storage
from raysft.pipeline.data import plan
from raysft.pipeline.data.shards import load_index, read_shard
from raysft.pipeline.storage import StorageError, StorageOptions
from raysft.pipeline.training.reader import reader_for

# Fake credentials for the local server, set at import (before any Ray instance or head starts, so Ray
# workers inherit them the way they inherit a user's AWS_* variables). Distinctive values, so the tests can
# search what was written for them: they must never be written anywhere.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysft-moto-key-id-5c1e")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raysft-moto-secret-9b7d")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (port 0: any free port); yields (endpoint URL, filesystem); stopped after."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("raysft")
    yield endpoint, fs
    server.stop()


def opts(endpoint: str) -> StorageOptions:
    return StorageOptions(endpoint_url=endpoint)


def rows(n: int = 60, per_row: int = 3) -> list[dict]:
    import random

    rng = random.Random(0)
    return pack_rows([make_sample(rng, i) for i in range(n)], per_row)


def test_shards_on_s3_stream_like_local_ones(s3, tmp_path):
    endpoint, fs = s3
    import pyarrow as pa
    from train_fixtures import ROW_SCHEMA

    from raysft.pipeline.data.shards import ShardWriter

    local = write_shards(tmp_path / "train", rows(), rows_per_shard=3)
    writer = ShardWriter("s3://raysft/art/train", cache_key="test", options=opts(endpoint), max_rows=3)
    writer.write(pa.Table.from_pylist(rows(), schema=ROW_SCHEMA))
    writer.close()
    remote = load_index("s3://raysft/art/train", opts(endpoint))
    assert [s.rows for s in remote.shards] == [s.rows for s in load_index(local).shards]
    kw = dict(seed=1, window=2, rows_per_step=4, max_steps=None, epochs=2)
    with reader_for(remote, **kw) as r, reader_for(load_index(local), **kw) as q:
        for s in range(r.layout.total_steps):
            assert r.step(s)[1].to_pylist() == q.step(s)[1].to_pylist()
    assert fs.get_file_info("raysft/art/train/_index.json").type == pafs.FileType.File


def test_run_folder_lease_on_s3(s3, capfd):
    """pipeline/lease.py on s3:// (conditional writes: If-None-Match to create, If-Match to renew, take over and
    delete): a holder in another process refuses a taker in one sentence and its lease is taken over once it is
    killed; a holder elsewhere is taken over only once it stopped renewing (the store's clock); one of many
    takers wins; renewal keeps a short lease."""
    import lease_probes

    from raysft.pipeline import lease

    endpoint, fs = s3
    options = opts(endpoint)
    lease_probes.refused_by_and_taken_over_from_a_killed_process(
        lease.in_folder("s3://raysft/leases/killed"), options, capfd
    )
    assert fs.get_file_info("raysft/leases/killed/.raysft-lease.json").type == pafs.FileType.NotFound  # released
    lease_probes.elsewhere_refused_while_renewed_then_taken_over(
        lease.in_folder("s3://raysft/leases/elsewhere"), options, lambda: time.sleep(3.1)
    )
    lease_probes.one_of_many_takers_wins(lease.in_folder("s3://raysft/leases/race"), options)
    lease_probes.renewal_keeps_a_short_lease(lease.in_folder("s3://raysft/leases/renewed"), options)


def test_bad_storage_is_one_sentence_naming_the_uri(s3, monkeypatch):
    endpoint, fs = s3
    with pytest.raises(StorageError, match=r"^Cannot reach the object store for s3://raysft/x"):
        storage.check_location("s3://raysft/x", StorageOptions(endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StorageError, match=r"^The bucket of s3://no-such-bucket/x does not exist\.$"):
        storage.check_location("s3://no-such-bucket/x", opts(endpoint))
    with pytest.raises(StorageError, match=r"^Prepared train data in s3://raysft/nothing has no Parquet files\.$"):
        load_index("s3://raysft/nothing", opts(endpoint))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(StorageError, match=r"^No credentials for s3://raysft/x: set AWS_ACCESS_KEY_ID"):
        storage.check_location("s3://raysft/x", opts(endpoint))


def test_missing_or_truncated_shard_on_s3(s3):
    endpoint, fs = s3
    import pyarrow as pa
    from train_fixtures import ROW_SCHEMA

    from raysft.pipeline.data.shards import ShardWriter

    writer = ShardWriter("s3://raysft/bad/train", options=opts(endpoint), max_rows=4)
    writer.write(pa.Table.from_pylist(rows(), schema=ROW_SCHEMA))
    writer.close()
    with fs.open_input_stream("raysft/bad/train/shard-00001.parquet") as f:
        data = f.read()
    with fs.open_output_stream("raysft/bad/train/shard-00001.parquet") as f:
        f.write(data[: len(data) - 100])
    with pytest.raises(
        StorageError, match=r"^The prepared train shard s3://raysft/bad/train/shard-00001\.parquet is truncated"
    ):
        load_index("s3://raysft/bad/train", opts(endpoint))
    index = load_index("s3://raysft/bad/train", opts(endpoint), check=False)
    with pytest.raises(
        StorageError, match=r"^The prepared shard s3://raysft/bad/train/shard-00001\.parquet is truncated or corrupt"
    ):
        read_shard(index, 1)
    fs.delete_file("raysft/bad/train/shard-00001.parquet")
    with pytest.raises(
        StorageError,
        match=r"shard s3://raysft/bad/train/shard-00001\.parquet listed in .* is missing; write it again with "
        r"`raysft prepare CONFIG --output s3://raysft/bad`\.$",
    ):
        load_index("s3://raysft/bad/train", opts(endpoint))


def test_prepare_with_input_and_cache_on_s3(s3, tmp_path, chatml_tokenizer, monkeypatch, capsys):
    endpoint, fs = s3
    from raysft.pipeline.config import load_config

    tok = tmp_path / "tok"
    chatml_tokenizer.save_pretrained(tok)
    lines = [
        json.dumps({"instruction": "add", "input": f"{i} and {i + 1}", "output": str(2 * i + 1)}) for i in range(120)
    ]
    with fs.open_output_stream("raysft/inputs/train.jsonl") as f:
        f.write(("\n".join(lines) + "\n").encode())
    (tmp_path / "same.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    over = {
        "model.name_or_path": str(tok),
        "data.train": "s3://raysft/inputs/train.jsonl",
        "data.max_seq_len": 256,
        "data.cache_dir": "s3://raysft/cache",
        "data.tokenize_batch_size": 32,
        "data.shard_mb": 0.002,
        "storage.endpoint_url": endpoint,
    }
    cfg = load_config(None, over)
    prepared = plan.ensure_prepared(cfg, use_ray=False)
    assert str(prepared.train_dir) == f"s3://raysft/cache/{prepared.key}/train" and prepared.eval_dir is None
    index = load_index(prepared.train_dir, opts(endpoint))
    assert len(index.shards) > 1 and index.cache_key == prepared.key and index.rows == prepared.stats["packed_rows"]
    assert prepared.stats["rows_used"] == 120
    assert not Path("s3:").exists()  # nothing went to a local folder named after the scheme
    # Reused (same key, nothing rewritten), and equal to the same input prepared locally.
    info = fs.get_file_info(f"raysft/cache/{prepared.key}/stats.json")
    assert plan.ensure_prepared(cfg, use_ray=False).key == prepared.key
    assert fs.get_file_info(f"raysft/cache/{prepared.key}/stats.json").mtime == info.mtime
    local = plan.ensure_prepared(
        cfg.with_overrides({"data.train": str(tmp_path / "same.jsonl"), "data.cache_dir": str(tmp_path / "cache")}),
        use_ray=False,
    )
    import pyarrow.parquet as pq

    remote_rows = pq.read_table(f"raysft/cache/{prepared.key}/train", filesystem=fs).to_pylist()
    assert remote_rows == pq.read_table(local.train_dir).to_pylist()

    # A truncated shard of the cache entry in the bucket: found by its size, the entry rebuilt (one line said)
    # with the same bytes as before.
    def entry_bytes() -> dict[str, bytes]:
        selector = pafs.FileSelector(f"raysft/cache/{prepared.key}/train", recursive=True)
        return {i.path: fs.open_input_stream(i.path).read() for i in fs.get_file_info(selector)}

    before = entry_bytes()
    shard = f"raysft/cache/{prepared.key}/train/shard-00001.parquet"
    with fs.open_output_stream(shard) as f:
        f.write(before[shard][:50])
    capsys.readouterr()
    assert plan.ensure_prepared(cfg, use_ray=False).key == prepared.key
    said = [line for line in capsys.readouterr().err.splitlines() if "cache entry" in line]
    assert said == [
        f"raysft: the prepared-data cache entry s3://raysft/cache/{prepared.key} is damaged (The prepared train "
        f"shard s3://{shard} is truncated or changed (50 bytes, the index says {len(before[shard])})); rebuilding it."
    ]
    assert entry_bytes() == before


def _kill_a_worker_after_checkpoint(fs, run_path: str, killed: dict, gcs_address: str) -> None:
    """SIGKILL a Ray Train worker once the controller registered the step-2 checkpoint in the bucket."""
    import signal

    from ray.util.state import list_actors

    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            with fs.open_input_stream(f"{run_path}/checkpoint_manager_snapshot.json") as f:
                name = json.loads(f.read())["latest_checkpoint_result"]["checkpoint_dir_name"]
            if int(name.split("_")[1]) >= 2:
                break
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass
        time.sleep(0.1)
    actors = list_actors(address=gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if actors:
        pid = max(a.pid for a in actors)
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid


@pytest.mark.ray
@pytest.mark.slow
def test_train_with_prepared_rows_and_run_storage_on_s3(s3, ray_session, tiny_model_dir, tmp_path, monkeypatch):
    """The prepared shards and run.storage_path on s3://: workers stream from the bucket; a worker killed after
    the first checkpoint resumes from the bucket (exactly-once ledger); checkpoints, metrics, the ledger and the
    adapter land in the bucket; nothing is written under a local `s3:` folder; `raysft export` reads the run."""
    from safetensors.torch import load as load_safetensors
    from train_fixtures import Prepared

    from raysft.pipeline import trainer
    from raysft.pipeline.config import load_config
    from raysft.pipeline.errors import RunInUseError
    from raysft.pipeline.trainer import build_trainer, finish_run, hold_run_folder, preflight

    endpoint, fs = s3
    monkeypatch.chdir(tmp_path)
    import random

    rng = random.Random(0)
    train = pack_rows([make_sample(rng, i) for i in range(24)], 3)
    evals = pack_rows([make_sample(rng, 10_000 + i) for i in range(6)], 3)
    import pyarrow as pa
    from train_fixtures import ROW_SCHEMA

    from raysft.pipeline.data.shards import ShardWriter

    for split, data in (("train", train), ("eval", evals)):
        w = ShardWriter(f"s3://raysft/prep/{split}", options=opts(endpoint), max_rows=2)
        w.write(pa.Table.from_pylist(data, schema=ROW_SCHEMA))
        w.close()
    over = {
        "model.name_or_path": str(tiny_model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.0,
        "train.max_steps": 4,
        "train.save_every": 2,
        "train.eval_every": 4,
        "train.grad_accum": 1,
        "scaling.num_workers": 2,
        "run.name": "s3run",
        "run.storage_path": "s3://raysft/runs",
        "run.max_failures": 1,
        "storage.endpoint_url": endpoint,
    }
    cfg = preflight(load_config(None, over))
    prepared = Prepared("s3://raysft/prep/train", "s3://raysft/prep/eval", {})
    killed: dict = {}

    def kill_then_train_again() -> None:  # mid-run: a worker is killed, and a second train of the run is refused
        _kill_a_worker_after_checkpoint(fs, "raysft/runs/s3run", killed, ray_session.get_runtime_context().gcs_address)
        try:
            trainer.train(cfg)
        except RunInUseError as exc:
            killed["second"] = str(exc)

    killer = threading.Thread(target=kill_then_train_again, daemon=True)
    killer.start()
    # The console follows the run folder in the bucket (console.RunFollower through pyarrow.fs).
    import io

    from raysft.pipeline.console import Console, follow_run

    out = io.StringIO()
    with hold_run_folder(cfg), follow_run("s3://raysft/runs/s3run", Console(out, bar=False), options=opts(endpoint)):
        result = finish_run(cfg, build_trainer(cfg, prepared).fit())
    killer.join(timeout=60)
    assert killed.get("second", "").startswith(
        f"The run folder s3://raysft/runs/s3run is in use by raysft on host {socket.gethostname()} (pid {os.getpid()}, "
    ), killed
    assert fs.get_file_info("raysft/runs/s3run/.raysft-lease.json").type == pafs.FileType.NotFound  # released
    assert result.run_dir == "s3://raysft/runs/s3run" and "eval_loss" in result.metrics
    # Recovery from a killed worker with checkpoints on s3://: the group restarted from the bucket's checkpoint.
    assert "pid" in killed, "no worker was killed"
    with fs.open_input_stream("raysft/runs/s3run/events.jsonl") as f:
        starts = [e for e in map(json.loads, f.read().decode().splitlines()) if e["event"] == "start"]
    assert [e["step"] for e in starts][0] == 0 and len(starts) == 2 and starts[1]["step"] >= 2, starts
    shown = out.getvalue()
    assert "training 4 steps on 2 worker(s)" in shown, shown
    assert "checkpoint saved: step 2 -> s3://raysft/runs/s3run/checkpoint_000002" in shown, shown
    assert "recovered: worker rank" in shown and f"resumed from step {starts[1]['step']}" in shown, shown
    assert [line.split()[1] for line in shown.splitlines() if line.startswith("  step ")][-1] == "4/4", shown
    with fs.open_input_stream("raysft/runs/s3run/samples.jsonl") as f:
        entries = [json.loads(x) for x in f.read().decode().splitlines()]
    from audit import check_exactly_once

    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    check_exactly_once(entries)
    listed = {
        i.path.removeprefix("raysft/runs/s3run/").split("/")[0]
        for i in fs.get_file_info(pafs.FileSelector("raysft/runs/s3run", recursive=True))
    }
    assert {
        "checkpoint_000002",
        "checkpoint_000004",
        "metrics.jsonl",
        "samples.jsonl",
        "events.jsonl",
        "adapter",
        "config.yaml",
    } <= listed, listed
    with fs.open_input_stream("raysft/runs/s3run/metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f.read().decode().splitlines()] == [1, 2, 3, 4]
    with fs.open_input_stream("raysft/runs/s3run/adapter/adapter_model.safetensors") as f:
        assert load_safetensors(f.read())
    assert not Path("s3:").exists() and not (Path.home() / "s3:").exists()

    # `raysft export s3://... --merge --output DIR`: the endpoint from the standard AWS_ENDPOINT_URL.
    from transformers import AutoModelForCausalLM

    from raysft.pipeline.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert main(["export", "s3://raysft/runs/s3run", "--merge", "--output", str(tmp_path / "merged")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16
    assert main(["export", "s3://raysft/runs/s3run", "--output", "s3://raysft/handout/adapter"]) == 0
    assert fs.get_file_info("raysft/handout/adapter/adapter_config.json").type == pafs.FileType.File
    assert not Path("s3:").exists()


def test_run_identity_on_s3_is_the_local_rule(s3):
    """identity.decide / apply through storage: the same resume, extend and refusal sentences (naming the keys
    that differ) for a run folder in a bucket as for a local one."""
    endpoint, fs = s3
    from raysft.pipeline.config import load_config
    from raysft.pipeline.errors import CheckpointError
    from raysft.pipeline.run_folder import run_dir_of
    from raysft.pipeline.storage import StorageOptions
    from raysft.pipeline.training import identity

    def rerun(c, steps_per_epoch=4):
        decision = identity.decide(c, "k", run_dir_of(c), steps_per_epoch, StorageOptions.of(c))
        identity.apply(decision, c.dump_yaml(), StorageOptions.of(c))
        return decision

    cfg = load_config(
        None, {"run.storage_path": "s3://raysft/ident", "run.name": "r", "storage.endpoint_url": endpoint}
    )
    assert rerun(cfg).mode == "new"
    assert fs.get_file_info("raysft/ident/r/run.json").type == pafs.FileType.File
    assert fs.get_file_info("raysft/ident/r/config.yaml").type == pafs.FileType.File
    assert rerun(cfg).mode == "resume"
    changed = r"^Run r in s3://raysft/ident/r was started with other settings \(train\.lr [^ ]+ -> 0\.001\)"
    with pytest.raises(CheckpointError, match=changed):
        rerun(cfg.with_overrides({"train.lr": 1e-3}))
    with pytest.raises(CheckpointError, match=r"run\.resume is 'never'"):
        rerun(cfg.with_overrides({"run.resume": "never"}))
    longer = cfg.with_overrides({"train.epochs": cfg.train.epochs + 1})
    assert rerun(longer).mode == "extend"
    assert json.loads(fs.open_input_stream("raysft/ident/r/run.json").read())["total_steps"] == 4 * longer.train.epochs
    with pytest.raises(CheckpointError, match=r"can only be extended"):
        rerun(cfg)


@pytest.mark.slow
def test_torchrun_entry_with_run_storage_on_s3(s3, tiny_model_dir, tmp_path, monkeypatch):
    """Issue 20 item 7: the torchrun entry (one gloo process, no Ray) with run.storage_path on s3://: metrics,
    events, the ledger, the kept checkpoints and the adapter land in the bucket; a lost last checkpoint resumes
    from the one before it, downloaded from the bucket; nothing is written under a local `s3:` folder."""
    import torch.multiprocessing as mp
    from dist_workers import torchrun_worker
    from local_processes import free_port
    from train_fixtures import make_prepared

    from raysft.pipeline.config import load_config
    from raysft.pipeline.run_folder import read_events
    from raysft.pipeline.training import ledger as ledger_io

    endpoint, fs = s3
    monkeypatch.chdir(tmp_path)
    prepared = make_prepared(tmp_path / "data", n_train=12, n_eval=3, per_row=3)
    config = tmp_path / "torchrun.yaml"
    over = {
        "model.name_or_path": str(tiny_model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.0,
        "train.max_steps": 4,
        "train.save_every": 2,
        "train.eval_every": 4,
        "train.grad_accum": 1,
        "train.micro_batch_size": 1,
        "run.name": "tr",
        "run.storage_path": "s3://raysft/torchrun",
        "storage.endpoint_url": endpoint,
    }
    config.write_text(load_config(None, over).dump_yaml())

    def torchrun() -> None:
        args = (1, free_port(), str(config), str(prepared.train_dir.parent), [])
        mp.start_processes(torchrun_worker, args=args, nprocs=1, start_method="spawn")

    def listing() -> set[str]:
        infos = fs.get_file_info(pafs.FileSelector("raysft/torchrun/tr", recursive=True))
        return {i.path.removeprefix("raysft/torchrun/tr/") for i in infos if i.type == pafs.FileType.File}

    def staged(name: str, into: Path) -> Path:
        assert storage.download(f"s3://raysft/torchrun/tr/{name}", into / name, opts(endpoint))
        return into / name

    torchrun()
    files = listing()
    assert {"metrics.jsonl", "events.jsonl", "samples.jsonl", "adapter/adapter_model.safetensors"} <= files, files
    assert {f.split("/")[0] for f in files if f.startswith("checkpoint_")} == {"checkpoint_000002", "checkpoint_000004"}

    # The last checkpoint and the adapter are lost: the second start resumes from step 2, from the bucket.
    fs.delete_dir("raysft/torchrun/tr/checkpoint_000004")
    fs.delete_dir("raysft/torchrun/tr/adapter")
    torchrun()
    local = tmp_path / "fetched"
    starts = [e["step"] for e in read_events(staged("events.jsonl", local).parent) if e["event"] == "start"]
    assert starts == [0, 2]
    assert [r["step"] for r in jsonl_rows(staged("metrics.jsonl", local))] == [1, 2, 3, 4]
    assert [e["step"] for e in ledger_io.Ledger(staged("samples.jsonl", local)).entries()] == [1, 2, 3, 4]
    assert "adapter/adapter_model.safetensors" in listing() and "checkpoint_000004/state.json" in listing()
    assert not Path("s3:").exists()


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.slow
def test_tune_grid_shares_one_prepared_artifact_on_s3(s3, ray_session, tiny_model_dir, tmp_path, monkeypatch):
    """A 2-trial grid whose input, prepared cache and sweep folder are on s3://: prepared once (Ray Data's tokenizer
    actors read the object), both trials stream the same shards from the bucket, and Tune's experiment folder, the
    trials' run folders, results.csv, the plots and the best adapter are all in the bucket (nothing local)."""
    import csv
    import random

    from raysft.pipeline import tune
    from raysft.pipeline.config import load_config

    endpoint, fs = s3
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    lines = []
    for _ in range(60):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"what is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} equals {a + b}"},
                    ]
                }
            )
        )
    with fs.open_output_stream("raysft/tune-in/train.jsonl") as f:
        f.write(("\n".join(lines) + "\n").encode())
    cfg = load_config(
        None,
        {
            "model.name_or_path": str(tiny_model_dir),
            "model.quantization": "none",
            "model.dtype": "float32",
            "model.gradient_checkpointing": False,
            "lora.dropout": 0.0,
            "data.train": "s3://raysft/tune-in/train.jsonl",
            "data.eval_split": 0.2,
            "data.max_seq_len": 128,
            "data.cache_dir": "s3://raysft/tune-cache",
            "data.num_tokenizer_actors": 1,
            "data.shard_mb": 0.002,
            "train.max_steps": 2,
            "train.eval_every": 2,
            "train.save_every": 2,
            "train.logging.tensorboard": False,
            "scaling.num_workers": 1,
            "run.storage_path": "s3://raysft/sweeps",
            "run.max_failures": 0,
            "run.name": "grid",
            "storage.endpoint_url": endpoint,
            "tune": {"search_space": {"lora.r": [4, 8]}, "search_alg": "grid", "scheduler": "none"},
        },
    )
    sweep = tune(cfg)
    assert sweep.sweep_dir == "s3://raysft/sweeps/grid" and sweep.best.adapter == f"{sweep.sweep_dir}/best_adapter"

    def read(path: str) -> bytes:
        with fs.open_input_stream(f"raysft/sweeps/grid/{path}") as f:
            return f.read()

    rows = list(csv.DictReader(read("results.csv").decode().splitlines()))
    assert sorted(int(r["lora.r"]) for r in rows) == [4, 8]
    keys = {i.path.split("/")[2] for i in fs.get_file_info(pafs.FileSelector("raysft/tune-cache", recursive=True))}
    assert len(keys) == 1  # one prepared artifact for both trials
    key = keys.pop()
    assert len(load_index(f"s3://raysft/tune-cache/{key}/train", opts(endpoint)).shards) > 1
    ledgers = []
    for row in rows:
        trial = f"trials/{row['trial_id']}"
        ledgers.append(read(f"{trial}/samples.jsonl"))
        reads = [json.loads(x) for x in read(f"{trial}/events.jsonl").decode().splitlines()]
        assert any(e.get("event") == "reader" and e["reads"] for e in reads)
        assert json.loads(read(f"{trial}/trial.json"))["adapter"] == f"s3://raysft/sweeps/grid/{trial}/adapter"
        assert read(f"{trial}/adapter/adapter_config.json") and read(f"{trial}/attempts.jsonl")
        assert read(f"tune/{row['trial_id']}/result.json")  # Tune's per-trial results, in its experiment folder
    assert ledgers[0] == ledgers[1]  # same artifact, same seed: the same rows per step
    everything = fs.get_file_info(pafs.FileSelector("raysft/sweeps/grid", recursive=True))
    listed = {i.path.removeprefix("raysft/sweeps/grid/") for i in everything}
    for name in ("sweep.yaml", "events.jsonl", "loss_vs_lr.png", "eval_curves.png", "best_config.yaml"):
        assert name in listed, sorted(listed)
    assert "best_adapter/adapter_config.json" in listed and any(n.startswith("tune/experiment_state") for n in listed)
    assert read("loss_vs_lr.png")[:4] == b"\x89PNG"
    assert not Path("s3:").exists() and not list(tmp_path.rglob("s3:"))


@pytest.fixture
def s3_head(s3, ray_head):
    """The suite's shared local Ray head (conftest.ray_head), whose environment holds the AWS_* credentials (set at
    this module's import, before any head starts), the way a cluster's nodes have theirs (variables, files or an
    instance role); the endpoint travels in the config."""
    assert ray_head.env["AWS_SECRET_ACCESS_KEY"] == os.environ["AWS_SECRET_ACCESS_KEY"]
    return ray_head


@pytest.mark.ray
@pytest.mark.slow
def test_submit_wait_of_a_run_on_s3(s3, s3_head, tiny_model_dir, tmp_path):
    """`raysft submit --wait` of a run whose prepared cache and run.storage_path are on s3://: the job trains, its
    console follows the run folder in the bucket, checkpoints/metrics/adapter are listed there, and no secret is
    in the job's runtime_env, its metadata or any object it wrote."""
    from ray.job_submission import JobSubmissionClient
    from test_submit import job_id_of, raysft, write_project

    endpoint, fs = s3
    proj = tmp_path / "proj"
    cfg = write_project(proj, tiny_model_dir, "s3://raysft/jobruns")
    over = ["data.cache_dir=s3://raysft/jobcache", f"storage.endpoint_url={endpoint}"]
    proc = raysft(
        ["submit", str(cfg), "--address", s3_head.url, "--wait", *[a for o in over for a in ("--set", o)]],
        env=s3_head.client_env(),
        cwd=proj,
        timeout=600,
    )
    job = job_id_of(proc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The job's console followed the run folder in the bucket (its lines are in the streamed logs).
    assert "training 3 steps on 1 worker(s)" in proc.stdout and "  step 3/3  loss" in proc.stdout, proc.stdout[-3000:]
    assert "checkpoint saved: step 2 -> s3://raysft/jobruns/tiny-job/checkpoint_000002" in proc.stdout

    listed = {i.path for i in fs.get_file_info(pafs.FileSelector("raysft/jobruns/tiny-job", recursive=True))}
    for name in ("checkpoint_000002/state.json", "metrics.jsonl", "samples.jsonl", "adapter/adapter_config.json"):
        assert f"raysft/jobruns/tiny-job/{name}" in listed, sorted(listed)
    with fs.open_input_stream("raysft/jobruns/tiny-job/metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f.read().decode().splitlines()] == [1, 2, 3]
    cache = [i.path for i in fs.get_file_info(pafs.FileSelector("raysft/jobcache", recursive=True))]
    assert any(p.endswith("/train/_index.json") for p in cache), cache

    # No secret in what was submitted, nor in anything the job wrote to the bucket (config.yaml, run.json, ...).
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    info = JobSubmissionClient(s3_head.url, headers={"Authorization": f"Bearer {s3_head.token}"}).get_job_info(job)
    submitted = json.dumps([info.runtime_env, info.metadata, info.entrypoint], default=str)
    shipped = (info.runtime_env or {}).get("env_vars") or {}
    # only raysft's recovery settings travel as env_vars (pipeline/ray_recovery.py); credentials never do
    assert not any(v in submitted for v in secrets) and all(k.startswith("RAY_TRAIN_") for k in shipped), submitted
    written = [i.path for i in fs.get_file_info(pafs.FileSelector("raysft/jobruns/tiny-job", recursive=True))]
    assert "raysft/jobruns/tiny-job/config.yaml" in written and "raysft/jobruns/tiny-job/run.json" in written
    for path in written + cache:
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                data = f.read()
            assert not any(v.encode() in data for v in secrets), f"a credential was written to s3://{path}"
    assert not (proj / "s3:").exists()
