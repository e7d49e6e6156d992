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
    rank: int, world: int, port: int, model_dir: str, prepared: str, out: str, kernels: list[bool]
) -> None:
    """For each setting of `kernels`, in turn: a fresh model and ZeRO-3 engine, three optimizer steps (one
    micro-batch each); write whether the parameter trace is complete after each step (one process group and
    one process start for all the settings)."""
    _env(rank, world, port)
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    from audit import read_split
    from tiny import fp32_cfg

    from raysft.pipeline.models.load import build_model
    from raysft.pipeline.training.engine import DeepSpeedStepEngine, deepspeed_config
    from raysft.pipeline.training.step import (
        collate_table,
        make_optimizer,
        optimizer_step,
    )

    dist.init_process_group("gloo")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    table = read_split(Path(prepared) / "train", "train")
    results = {}
    for fused in kernels:
        cfg = fp32_cfg(
            model_dir,
            **{"train.kernels": fused, "train.deepspeed.stage": 3, "train.max_steps": 2, "scaling.num_workers": world},
        )
        model = build_model(cfg, device="cpu")
        opt, sched = make_optimizer(model, cfg.train, 2)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            lr_scheduler=sched,
            config=deepspeed_config(cfg, world),
            dist_init_required=False,
        )
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        complete, losses = [], []
        for step in range(3):
            mb = collate_table(table, [2 * step + rank])
            res = optimizer_step(DeepSpeedStepEngine(engine), [mb], mb.n_trained, kernels=fused, device="cpu")
            complete.append(coordinator.is_complete_trace())
            losses.append(res.loss_sum)
        results[str(fused)] = {"complete": complete, "losses": losses}
        engine.destroy()
        del engine, model, opt, sched, coordinator
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ---------------------------------------------------------------- collective recorder (issue 20 item 1)

# torch.distributed's collectives; DeepSpeed's comm layer calls these too.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "barrier",
    "all_to_all_single",
)
# The device types each backend takes (torch's Backend.default_device_backend_map): NCCL has no CPU path.
DEVICE_RULE = {"nccl": {"cuda"}, "gloo": {"cpu"}}


class Emulated(Exception):
    """Raised after recording a collective of an emulated group (fake tensors hold no values to reduce)."""


class CollectiveRecorder:
    """Wraps torch.distributed's collectives: records each call's op, tensor devices, backend, the raysft
    function that called it directly (`site`; None for DeepSpeed's own) and the innermost raysft function
    outside training/collectives.py on the stack (`caller`). `emulate` (e.g. "nccl"): the group is taken to be
    of that backend and the call is not run (raises `Emulated` once recorded), so FakeTensorMode tensors on
    cuda can be checked."""

    def __init__(self, emulate: str | None = None) -> None:
        self.emulate = emulate
        self.records: list[dict] = []
        self._saved: dict = {}

    def install(self) -> CollectiveRecorder:
        import torch.distributed as dist

        for name in COLLECTIVES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        import torch
        import torch.distributed as dist

        def recorded(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            for a in (*args, *kwargs.values()):
                if isinstance(a, (list, tuple)):
                    tensors += [x for x in a if isinstance(x, torch.Tensor)]
            backend = self.emulate or str(dist.get_backend(kwargs.get("group")))
            devices = sorted({t.device.type for t in tensors})
            site, sites = _raysft_sites()
            caller = next((x for x in sites if not x.startswith("collectives.py:")), None)
            self.records.append({"op": name, "backend": backend, "devices": devices, "site": site, "caller": caller})
            if self.emulate is not None:
                bad = [d for d in devices if d not in DEVICE_RULE[backend]]
                if bad:  # what an NCCL group says
                    raise RuntimeError(f"No backend type associated with device type {bad[0]}")
                raise Emulated(name)
            return fn(*args, **kwargs)

        return recorded

    def mismatches(self) -> list[dict]:
        """Calls a group of the recorded backend would reject."""
        return [r for r in self.records if any(d not in DEVICE_RULE[r["backend"]] for d in r["devices"])]


def _raysft_sites() -> tuple[str | None, list[str]]:
    """(`module.py:function` of the frame that called the collective when it is raysft code, else None;
    every raysft frame on the stack, innermost first)."""
    import sys

    def where(frame) -> str | None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if ("/pipeline/" in path or "/kernels/" in path) and "/site-packages/" not in path:
            return f"{path.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
        return None

    direct = sys._getframe(2)  # 0: here, 1: the recorder's wrapper, 2: whoever called the collective
    sites, frame = [], direct
    while frame is not None:
        if (site := where(frame)) is not None:
            sites.append(site)
        frame = frame.f_back
    return where(direct), sites


def recorded_torchrun_worker(
    rank: int,
    world: int,
    port: int,
    config: str,
    prepared: str,
    overrides: list[str],
    out: str,
    sigterm_after: int | None,
) -> None:
    """`torchrun_worker` with every collective recorded into OUT.rankR.json. `sigterm_after`: rank 1 sends
    itself SIGTERM (a real preemption notice) once it has seen that many collectives."""
    import signal

    recorder = CollectiveRecorder()
    if sigterm_after is not None and rank == 1:
        import torch.distributed as dist

        inner, sent = dist.all_reduce, []

        def all_reduce(*args, **kwargs):
            out = inner(*args, **kwargs)
            steps = [r for r in recorder.records if r["site"] and r["caller"].startswith("loop.py:")]
            if len(steps) >= sigterm_after and not sent:  # a real SIGTERM, read at a later step boundary
                sent.append(os.kill(os.getpid(), signal.SIGTERM))
            return out

        dist.all_reduce = all_reduce  # under the recorder, so the recorder sees the caller of all_reduce
    recorder.install()
    try:
        torchrun_worker(rank, world, port, config, prepared, overrides)
    finally:
        recorder.uninstall()
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(recorder.records))
