"""Worker functions that tests start as real processes (torch.multiprocessing spawn): the torchrun entry
under torch.distributed (gloo), and a DeepSpeed ZeRO-3 step loop that reports its parameter trace."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
    )


def torchrun_worker(rank: int, world: int, port: int, config: str, prepared: str, overrides: list[str]) -> None:
    """One rank of `python -m raysft.pipeline.training.torchrun_entry CONFIG --prepared DIR --set ...`."""
    _env(rank, world, port)
    from raysft.pipeline.training.torchrun_entry import main

    code = main([config, "--prepared", prepared, *sum((["--set", o] for o in overrides), [])])
    if code != 0:
        raise SystemExit(code)


def zero3_trace_worker(
    rank: int, world: int, port: int, model_dir: str, prepared: str, out: str, kernels: bool
) -> None:
    """Two ZeRO-3 optimizer steps (one micro-batch each); write whether the parameter trace is complete after each."""
    _env(rank, world, port)
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    from audit import read_split

    from raysft.pipeline.config import load_config
    from raysft.pipeline.models.load import build_model
    from raysft.pipeline.training.loop import DeepSpeedStepEngine, deepspeed_config
    from raysft.pipeline.training.step import (
        collate_table,
        make_optimizer,
        optimizer_step,
    )

    dist.init_process_group("gloo")
    cfg = load_config(
        None,
        overrides={
            "model.name_or_path": model_dir,
            "model.quantization": "none",
            "model.dtype": "float32",
            "model.gradient_checkpointing": False,
            "lora.r": 4,
            "lora.alpha": 8,
            "lora.dropout": 0.0,
            "train.kernels": kernels,
            "train.deepspeed.stage": 3,
            "train.max_steps": 2,
            "scaling.num_workers": world,
        },
    )
    table = read_split(Path(prepared) / "train", "train")
    model = build_model(cfg, device="cpu")
    opt, sched = make_optimizer(model, cfg.train, 2)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world), dist_init_required=False
    )
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    complete, losses = [], []
    for step in range(3):
        mb = collate_table(table, [2 * step + rank])
        res = optimizer_step(DeepSpeedStepEngine(engine), [mb], mb.n_trained, kernels=kernels, device="cpu")
        complete.append(coordinator.is_complete_trace())
        losses.append(res.loss_sum)
    if rank == 0:
        Path(out).write_text(json.dumps({"complete": complete, "losses": losses}))
    dist.destroy_process_group()
