"""Issue 11's GPU-path fixes that a CPU can show, without Ray: preflights, the autoscaler-aware resource
check, the generated DeepSpeed config, per-device RNG state, all-reduced token counts, and the ZeRO-3 +
kernels parameter trace (a real DeepSpeed ZeRO-3 run on gloo)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from local_processes import free_port
from train_fixtures import make_prepared

from raysft.pipeline.cluster_checks import (
    Capacity,
    NodeGroup,
    autoscaler_maximum,
    check_workers_fit,
)
from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ClusterError, ConfigError


def cfg_of(**over):
    return load_config(None, overrides=over)


def test_gpus_per_worker_must_be_one_with_gpus():
    cfg_of(**{"scaling.use_gpu": True, "scaling.gpus_per_worker": 1})
    cfg_of(**{"scaling.use_gpu": False, "scaling.gpus_per_worker": 2})  # no GPUs: unused
    for bad in (2, 0.5):
        with pytest.raises(ConfigError, match="scaling.gpus_per_worker must be 1"):
            cfg_of(**{"scaling.use_gpu": True, "scaling.gpus_per_worker": bad})


def test_quant_storage_is_uint8_or_model_dtype():
    for dtype, storage in [
        ("bfloat16", None),
        ("bfloat16", "bfloat16"),
        ("float32", "float32"),
        ("float32", "uint8"),
        ("bfloat16", "uint8"),
    ]:
        cfg_of(**{"model.dtype": dtype, "model.quant_storage": storage})
    with pytest.raises(ConfigError, match="model.quant_storage bfloat16 must be uint8 or equal to model.dtype"):
        cfg_of(**{"model.dtype": "float32", "model.quant_storage": "bfloat16"})
    # Without a 4-bit base there is nothing to corrupt.
    cfg_of(**{"model.quantization": "none", "model.dtype": "float32", "model.quant_storage": "bfloat16"})


def test_quant_storage_defaults_to_model_dtype(tiny_model_dir):
    from raysft.pipeline.models.load import load_base_model

    model = load_base_model(
        cfg_of(
            **{"model.name_or_path": str(tiny_model_dir), "model.dtype": "float32", "model.compute_dtype": "float32"}
        ).model,
        device="cpu",
    )
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float32  # the packed 4-bit data lives in model.dtype containers


# The cluster recipes: a CPU head and up to 4 GPU workers, 2 of them up.
RECIPE = [NodeGroup({"CPU": 8, "GPU": 1}, 4)]
UP_NOW = {"CPU": 4 + 2 * 8, "GPU": 2}


def gpu_scaling(workers: int):
    return cfg_of(**{"scaling.use_gpu": True, "scaling.num_workers": workers, "scaling.cpus_per_worker": 4}).scaling


def test_resource_check_counts_what_the_autoscaler_can_add(caplog):
    most = autoscaler_maximum(RECIPE, head={"CPU": 4})
    assert most == {"CPU": 36.0, "GPU": 4.0}
    autoscaling = Capacity(UP_NOW, most)
    with caplog.at_level(logging.WARNING, logger="raysft.cluster"):
        check_workers_fit(gpu_scaling(4), autoscaling)  # 4 GPUs: not up yet, but the cluster can grow to them
    assert "autoscaler may add up to 4" in caplog.text
    with pytest.raises(ClusterError, match=r"needs 5 GPUs .* can grow to 4"):
        check_workers_fit(gpu_scaling(5), autoscaling)
    # A fixed cluster (no autoscaler config) is judged by what is up.
    with pytest.raises(ClusterError, match=r"needs 3 GPUs .* has 2"):
        check_workers_fit(gpu_scaling(3), Capacity(UP_NOW))
    # An autoscaler that runs but did not report its node groups (v1 monitor): warn, do not refuse.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raysft.cluster"):
        check_workers_fit(gpu_scaling(4), Capacity(UP_NOW, autoscaling=True))
    assert "an autoscaler whose maximum is unknown" in caplog.text
    # Unlimited node groups and the cluster-wide cap.
    assert autoscaler_maximum([NodeGroup({"GPU": 1}, -1)])["GPU"] == float("inf")
    assert autoscaler_maximum(RECIPE, head={"CPU": 4}, limits={"GPU": 3})["GPU"] == 3


def test_sweep_concurrency_uses_the_autoscaler_maximum():
    from raysft.pipeline.sweep.run import max_concurrent_trials

    cfg = cfg_of(**{"scaling.use_gpu": True, "scaling.num_workers": 2, "scaling.cpus_per_worker": 2})
    assert max_concurrent_trials(cfg, Capacity(UP_NOW)) == 1
    assert max_concurrent_trials(cfg, Capacity(UP_NOW, autoscaler_maximum(RECIPE, head={"CPU": 4}))) == 2


def test_generated_deepspeed_config_accumulates_in_fp32():
    from raysft.pipeline.training.engine import deepspeed_config

    for stage in (1, 2, 3):
        ds = deepspeed_config(
            cfg_of(**{"train.deepspeed.stage": stage, "train.grad_accum": 8, "model.dtype": "bfloat16"}), 4
        )
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"] == {"enabled": True}
    user = {"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}
    assert deepspeed_config(cfg_of(), 2, user)["data_types"]["grad_accum_dtype"] == "fp32"
    # Stage 0 only supports the model's own dtype in DeepSpeed: leave it alone there (fp32 models only, below).
    assert "data_types" not in deepspeed_config(cfg_of(**{"train.deepspeed.stage": 0, "model.dtype": "float32"}), 1)


def test_stage_0_with_bf16_is_refused_in_one_sentence():
    """Issue 20 item 5: DeepSpeed's stage 0 accumulates in the model dtype; bf16 there is refused up front."""
    from raysft.pipeline.training.engine import check_precision

    with pytest.raises(ConfigError, match=r"^train.deepspeed.stage 0 with model.dtype bfloat16 .*stage 1 or higher"):
        check_precision(cfg_of(**{"train.deepspeed.stage": 0, "model.dtype": "bfloat16"}), None)
    check_precision(cfg_of(**{"train.deepspeed.stage": 0, "model.dtype": "float32"}), None)
    check_precision(cfg_of(**{"train.deepspeed.stage": 1, "model.dtype": "bfloat16"}), None)
    with pytest.raises(ConfigError, match="train.deepspeed.config's zero_optimization.stage 0"):
        check_precision(cfg_of(**{"model.dtype": "bfloat16"}), {"zero_optimization": {"stage": 0}})
    check_precision(cfg_of(**{"model.dtype": "bfloat16"}), {"zero_optimization": {"stage": 3}})


def test_attention_auto_and_a_refused_flash_config(monkeypatch):
    """Issue 20 item 3: auto is flash_attention_2 (varlen, no dense mask) only on GPUs with flash-attn importable;
    flash_attention_2 without the package is refused naming it; the flat layout follows flash."""
    from raysft.pipeline.training import loop

    monkeypatch.setattr(loop, "flash_attn_importable", lambda: False)
    assert loop.resolve_attention(cfg_of(**{"scaling.use_gpu": True})) == "sdpa"
    with pytest.raises(ConfigError, match=r"^model.attn_implementation flash_attention_2 needs the flash-attn package"):
        loop.resolve_attention(cfg_of(**{"model.attn_implementation": "flash_attention_2"}))
    monkeypatch.setattr(loop, "flash_attn_importable", lambda: True)
    assert loop.resolve_attention(cfg_of(**{"scaling.use_gpu": True})) == "flash_attention_2"
    assert loop.resolve_attention(cfg_of(**{"scaling.use_gpu": False})) == "sdpa"  # flash-attn has no CPU kernels
    assert loop.resolve_attention(cfg_of(**{"model.attn_implementation": "eager"})) == "eager"
    assert loop.layout_for(cfg_of(**{"model.attn_implementation": "flash_attention_2"})) == "flat"
    assert loop.layout_for(cfg_of()) == "rows"


def test_run_json_records_the_attention_the_run_used(tmp_path):
    from raysft.pipeline.training.identity import decide

    cfg = cfg_of(**{"model.attn_implementation": "sdpa", "run.storage_path": str(tmp_path)})
    assert decide(cfg, "key", tmp_path / "run").record["attention"] == "sdpa"


def test_rng_state_is_per_rank_and_own_device_only():
    from raysft.pipeline.training.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state("cpu")))
    assert "cuda" not in state and "device" not in state  # no per-index list of every visible GPU
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state, "cpu")
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    if torch.cuda.is_available():  # on a GPU machine: only this rank's device, restored onto whatever index it has
        dev = torch.device("cuda", torch.cuda.current_device())
        state = rng_state(dev)
        assert state["device"]["type"] == "cuda"
        a = torch.rand(4, device=dev)
        set_rng_state(state, dev)
        assert torch.equal(a, torch.rand(4, device=dev))


def test_rank_local_token_counts_sum_to_the_step_count(tmp_path):
    """What each rank counts of its own rows, summed (the all-reduce), is the step's N computed from every
    row, and the ledger's source ids come out in the same order as before (all rows of the step)."""
    from raysft.pipeline.data.shards import load_index
    from raysft.pipeline.training.loop import _step_sources
    from raysft.pipeline.training.reader import reader_for
    from raysft.pipeline.training.step import collate, trained_counts

    prepared = make_prepared(tmp_path, n_train=60, n_eval=0, per_row=3, rows_per_shard=3)
    split = np.arange(8).reshape(2, 2, 2)  # [grad_accum, world, micro]
    with reader_for(
        load_index(str(prepared.train_dir)), seed=0, window=2, rows_per_step=8, max_steps=None, epochs=2
    ) as reader:
        for step in range(reader.layout.total_steps):
            _, table = reader.step(step)
            counts = trained_counts(table.column("labels"))
            before = collate(table.take(split.reshape(-1).tolist()).to_pylist(), "flat")  # every rank, every row
            per_rank = [int(counts[split[:, r, :].reshape(-1)].sum()) for r in range(2)]
            assert sum(per_rank) == before.n_trained
            assert _step_sources(table, split) == before.source_ids


@pytest.fixture(scope="module")
def zero3_traces(tmp_path_factory, tiny_model_dir) -> dict:
    """One DeepSpeed ZeRO-3 run on CPU (2 gloo processes) per loss path, both in one process start: a fresh model
    and engine without the fused loss, then with it."""
    import torch.multiprocessing as mp
    from dist_workers import zero3_trace_worker

    tmp = tmp_path_factory.mktemp("zero3_trace")
    prepared = make_prepared(tmp / "data", n_train=24, n_eval=0, per_row=3)
    out = tmp / "trace.json"
    mp.start_processes(
        zero3_trace_worker,
        args=(2, free_port(), str(tiny_model_dir), str(prepared.train_dir.parent), str(out), [False, True]),
        nprocs=2,
        start_method="spawn",
    )
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [False, True])
def test_zero3_trace_completes_with_and_without_the_fused_loss(zero3_traces, kernels):
    """A DeepSpeed ZeRO-3 run on CPU (2 gloo processes): the parameter coordinator's trace is recorded in
    step 1 and complete from step 2 on, so ZeRO-3 prefetches, also when the fused loss computes the loss."""
    result = zero3_traces[str(kernels)]
    assert result["complete"] == [False, True, True], result
    assert all(np.isfinite(result["losses"]))


def test_a_local_instance_is_no_autoscaler_but_a_launcher_cluster_is():
    from raysft.pipeline.cluster_checks import autoscaler_has_node_types

    local = {"autoscaler_report": {"node_type_mapping": {"c907": "node_c907"}, "legacy": True}}
    launcher = {"autoscaler_report": {"node_type_mapping": {"c907": "ray.head.default", "a1b2": "gpu-workers"}}}
    assert not autoscaler_has_node_types(local) and not autoscaler_has_node_types({})
    assert autoscaler_has_node_types(launcher)


# ---------------------------------------------------------------- issue 20 item 1: one home for collectives

COLLECTIVES_MODULE = "pipeline/training/collectives.py"


def test_only_the_collectives_module_touches_torch_distributed():
    """Parse every module of the package: none but training/collectives.py imports torch.distributed or
    deepspeed.comm, or reaches them as an attribute (torch.distributed.all_reduce, dist.barrier, ...)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*(root / "pipeline").rglob("*.py"), *(root / "kernels").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel == COLLECTIVES_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]
            bad = [n for n in names if n.startswith(("torch.distributed", "deepspeed.comm")) or n == "deepspeed.comm"]
            if bad:
                offenders.append(f"{rel}:{node.lineno} {bad[0]}")
    assert not offenders, offenders


@pytest.fixture
def emulated_nccl(monkeypatch):
    """A world-1 gloo group that the recorder treats as NCCL, under FakeTensorMode (cuda tensors, no GPU)."""
    import torch.distributed as dist
    from dist_workers import CollectiveRecorder
    from torch._subclasses.fake_tensor import FakeTensorMode

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    recorder = CollectiveRecorder(emulate="nccl").install()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield recorder
    finally:
        recorder.uninstall()
        dist.destroy_process_group()


def test_checkpoint_space_check_hands_nccl_a_cuda_tensor(emulated_nccl, tmp_path):
    """The checkpoint's free-space agreement under an NCCL group: its collective gets cuda tensors (a CPU tensor
    is what crashed every GPU run's first checkpoint: "No backend type associated with device type cpu")."""
    from dist_workers import Emulated

    from raysft.pipeline.training import checkpoint as ckpt_io

    with pytest.raises(Emulated):
        ckpt_io._check_space(tmp_path, 1000, 3, True)
    assert emulated_nccl.records and not emulated_nccl.mismatches(), emulated_nccl.records


@pytest.mark.slow
def test_every_collective_of_a_gloo_run_goes_through_one_module_on_the_group_device(tmp_path, tiny_model_dir):
    """Two gloo ranks train through the torchrun entry (loop, eval, checkpoints) with every torch.distributed
    collective recorded; rank 1 gets a real SIGTERM mid-run (preemption: a checkpoint at every later step);
    then one rank resumes at the other world size (elastic re-partitioning). Every collective's tensors are on a
    device the backend takes, and each one raysft starts comes from training/collectives.py."""
    import shutil

    import torch.multiprocessing as mp
    from dist_workers import DEVICE_RULE, recorded_torchrun_worker

    from raysft.pipeline.trainer import preflight

    prepared = make_prepared(tmp_path / "data", n_train=48, n_eval=6, per_row=3, rows_per_shard=4)
    cfg = preflight(
        load_config(
            None,
            overrides={
                "model.name_or_path": str(tiny_model_dir),
                "model.quantization": "none",
                "model.dtype": "float32",
                "model.compute_dtype": "float32",
                "lora.r": 4,
                "lora.alpha": 8,
                "lora.dropout": 0.0,
                "train.epochs": 1,
                "train.micro_batch_size": 1,
                "train.grad_accum": 2,
                "train.save_every": 2,
                "train.eval_every": 2,
                "train.deepspeed.stage": 2,
                "scaling.num_workers": [1, 2],
                "run.storage_path": str(tmp_path / "runs"),
                "run.name": "recorded",
            },
        )
    )
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    out = tmp_path / "collectives"

    def start(world: int, sigterm_after: int | None, tag: str) -> list[dict]:
        mp.start_processes(
            recorded_torchrun_worker,
            args=(world, free_port(), str(config), str(prepared.train_dir.parent), [], f"{out}-{tag}", sigterm_after),
            nprocs=world,
            start_method="spawn",
        )
        return [r for rank in range(world) for r in json.loads(Path(f"{out}-{tag}.rank{rank}.json").read_text())]

    first = start(2, 3, "w2")  # SIGTERM to rank 1 in step 2
    run_dir = tmp_path / "runs" / "recorded"
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "preemption" for e in events)
    last = sorted(run_dir.glob("checkpoint_*"))[-1]
    shutil.rmtree(last)
    second = start(1, None, "w1")  # resumes from the checkpoint before, re-partitioned to 1 rank
    starts = [
        (e["world_size"], e["step"])
        for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
        if e["event"] == "start"
    ]
    assert [w for w, _ in starts] == [2, 1] and starts[1][1] > 0

    records = first + second
    assert set(DEVICE_RULE) >= {r["backend"] for r in records}
    bad = [r for r in records if any(d not in DEVICE_RULE[r["backend"]] for d in r["devices"])]
    assert not bad, bad
    ours = [r for r in records if r["site"] is not None]  # raysft's own calls, not DeepSpeed's
    outside = sorted({r["site"] for r in ours if not r["site"].startswith("collectives.py:")})
    assert not outside, f"collectives started outside training/collectives.py: {outside}"
    callers = {r["caller"] for r in ours}
    for path in ("checkpoint.py:_check_space", "loop.py:_evaluate"):
        assert path in callers, callers
    assert any(c.startswith("loop.py:") for c in callers - {"loop.py:_evaluate"}), callers
