"""The one home of raysft's torch.distributed calls (ARCHITECTURE.md, "Collectives").

Every tensor a collective gets is placed here, on the process group's device: an NCCL group takes cuda
tensors only (torch maps the backend to cuda, so a CPU tensor fails with "No backend type associated with
device type cpu", at world size 1 too), gloo takes CPU tensors. Callers hand in Python numbers or tensors and
get back a device tensor (no host sync) or, where they need one, host values: one device-to-host copy per
call. Without an initialised group every function acts as the world-size-1 case, without a collective.
`tests/test_gpu_path.py` parses the package and fails if any other module touches torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group=group) if is_distributed() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group=group) if is_distributed() else 1


def group_device(group=None) -> torch.device:
    """Where the group's collectives take their tensors: the current cuda device under NCCL, else the CPU."""
    if is_distributed() and str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(backend: str, device: torch.device | None = None, minutes: int = 10) -> None:
    """Join the process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if backend == "nccl":
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=minutes))
    else:
        dist.init_process_group(backend, timeout=timedelta(minutes=minutes))


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        if str(dist.get_backend()) == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _on_group(values: torch.Tensor | Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """`values` as a flat tensor where the group's collectives take it. Only host-to-device copies are
    non-blocking (a non-blocking copy to the host could be read before it lands); without a group a tensor
    stays where it is."""
    if isinstance(values, torch.Tensor):
        t = values.detach().reshape(-1).to(dtype=dtype)
        device = group_device() if is_distributed() else t.device
    else:
        t, device = torch.tensor(list(values), dtype=dtype), group_device()
    return t.to(device, non_blocking=t.device.type == "cpu" and device.type == "cuda")


def sum_on_device(values: torch.Tensor | Sequence[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sum over ranks; the result stays on the group's device (no host sync)."""
    t = _on_group(values, dtype)
    if is_distributed():  # world size 1 too: the GPU acceptance run exercises the NCCL path
        dist.all_reduce(t)
    return t


def to_host(t: torch.Tensor) -> list[float]:
    """The one device-to-host copy (a sync on a GPU) of values the caller reads."""
    return t.detach().tolist()


def sum_to_host(values: torch.Tensor | Sequence[float]) -> list[float]:
    """Sum over ranks, read on the host: one collective, one copy."""
    return to_host(sum_on_device(values))


def gather_to_host(values: Sequence[float]) -> list[list[float]]:
    """Every rank's `values` (the same length on all), in rank order: one collective, one copy."""
    t = _on_group(values, torch.float64)
    if not is_distributed():
        return [to_host(t)]
    out = torch.empty(world_size() * t.numel(), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t)
    flat = to_host(out)
    n = t.numel()
    return [flat[i : i + n] for i in range(0, len(flat), n)]
