"""One QLoRA optimizer step on packed rows, with plain torch: no Ray, no DeepSpeed needed.

The worker loop drives it through a DeepSpeed engine; a GPU benchmark drives it with `TorchEngine`.

Correctness by construction (pipeline/ARCHITECTURE.md):
- a micro-batch keeps its packed rows as separate sequences, no padding between samples; the
  forward gets `attention_mask=None`, the rows' `position_ids` (restarts at 0 keep samples apart)
  and `use_cache=False` (with a cache, packed samples attend to each other). Layout "rows" stacks the
  rows as [m, T_max] (the tail of a shorter row is a separate dummy sample with no loss), so
  attention costs m x T^2, not (mT)^2; layout "flat" puts them in one [1, sum T] sequence with the
  sample boundaries (`cu_seq_lens_q/k`, `max_length_q/k`) computed once here and passed to flash
  attention, which then never recomputes them from position_ids;
- the loss of a step is sum(CE over trained tokens) / N, N = trained tokens of the WHOLE step
  (all micro-batches, all ranks), so the update does not depend on how the step is split.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from raysft.pipeline.data.schema import IGNORE_INDEX, REQUIRED_COLUMNS

LAYOUTS = ("rows", "flat")


@dataclass
class MicroBatch:
    """Packed rows of one micro-batch: tensors are [B, T] ("rows": B rows; "flat": B = 1)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    n_trained: int  # tokens that carry loss (shifted labels != -100)
    source_ids: list[int] = field(default_factory=list)
    attn_kwargs: dict[str, Any] = field(default_factory=dict)  # flat layout: cu_seq_lens_q/k, max_length_q/k
    real_tokens: int | None = None  # tokens without the rows layout's padding (None: all of them)
    # Positions of labels[:, 1:].reshape(-1) that carry loss, found on the host in collate: the kernels' loss
    # selects them with index_select, which needs no host sync (a boolean mask would).
    trained_index: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel()) if self.real_tokens is None else self.real_tokens

    def to(self, device: torch.device | str) -> MicroBatch:
        """Host-to-device copies that do not block the host: from pinned memory on a GPU."""
        device = torch.device(device)
        kw = {k: _to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in self.attn_kwargs.items()}
        return MicroBatch(
            _to_device(self.input_ids, device),
            _to_device(self.position_ids, device),
            _to_device(self.labels, device),
            self.n_trained,
            self.source_ids,
            kw,
            self.real_tokens,
            _to_device(self.trained_index, device) if self.trained_index is not None else None,
        )


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def trained_tokens(labels: Sequence[int]) -> int:
    """Tokens of one packed row that carry loss; position 0 has nothing before it to predict from."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def trained_counts(labels_column) -> np.ndarray:
    """Trained tokens of every packed row of a pyarrow list<int> column, vectorised (first token never counts)."""
    import pyarrow as pa

    col = labels_column.combine_chunks() if isinstance(labels_column, pa.ChunkedArray) else labels_column
    offsets = col.offsets.to_numpy().astype(np.int64)
    trained = col.values.to_numpy(zero_copy_only=False) != IGNORE_INDEX
    csum = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
    starts, ends = offsets[:-1], offsets[1:]
    counts = csum[ends] - csum[starts]
    nonempty = ends > starts
    counts[nonempty] -= trained[starts[nonempty]]
    return counts


def _segments(position_ids: np.ndarray) -> np.ndarray:
    """Start offsets of the packed samples of one sequence (where position_ids restart), plus its end."""
    starts = np.flatnonzero(np.diff(position_ids, prepend=position_ids[:1] + 1) != 1)
    return np.append(starts, len(position_ids)).astype(np.int32)


def collate(rows: Sequence[Mapping[str, Any]], layout: str = "rows") -> MicroBatch:
    """Packed rows (dicts with input_ids, labels, position_ids[, source_ids]) -> one micro-batch."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
    pos = [np.asarray(r["position_ids"], dtype=np.int64) for r in rows]
    lab = [np.array(r["labels"], dtype=np.int64) for r in rows]
    src: list[int] = []
    n = 0
    for labels, row in zip(lab, rows):
        if len(labels):
            labels[0] = IGNORE_INDEX  # the first token of a row starts a sample: nothing in this row predicts it
        n += int((labels[1:] != IGNORE_INDEX).sum())
        src.extend(int(s) for s in row.get("source_ids", ()))
    real = sum(len(x) for x in ids)
    if layout == "flat":
        flat_pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        t = lambda xs: torch.from_numpy(np.concatenate(xs)).unsqueeze(0)  # noqa: E731  [1, T]
        cu = _segments(flat_pos)
        lengths = np.diff(cu)
        kw = {
            "cu_seq_lens_q": torch.from_numpy(cu),
            "cu_seq_lens_k": torch.from_numpy(cu),
            "max_length_q": int(lengths.max(initial=0)),
            "max_length_k": int(lengths.max(initial=0)),
        }
        flat_lab = np.concatenate(lab) if lab else np.zeros(0, np.int64)
        return MicroBatch(t(ids), t(pos), t(lab), n, src, kw, real, _trained_index(flat_lab[None, :]))
    width = max((len(x) for x in ids), default=0)
    out_ids = np.zeros((len(ids), width), np.int64)
    out_lab = np.full((len(ids), width), IGNORE_INDEX, np.int64)
    out_pos = np.tile(np.arange(width, dtype=np.int64), (len(ids), 1))
    for i, (a, p, b) in enumerate(zip(ids, pos, lab)):
        out_ids[i, : len(a)], out_pos[i, : len(a)], out_lab[i, : len(a)] = a, p, b
        out_pos[i, len(a) :] = np.arange(width - len(a))  # the tail restarts: a sample of its own, never attended to
    return MicroBatch(
        torch.from_numpy(out_ids),
        torch.from_numpy(out_pos),
        torch.from_numpy(out_lab),
        n,
        src,
        {},
        real,
        _trained_index(out_lab),
    )


def _trained_index(labels: np.ndarray) -> torch.Tensor:
    """Flat positions of labels[:, 1:] that carry loss (labels [B, T])."""
    return torch.from_numpy(np.flatnonzero(labels[:, 1:] != IGNORE_INDEX).astype(np.int64))


def collate_table(table, indices: Sequence[int], layout: str = "rows") -> MicroBatch:
    """`collate` of rows `indices` of a packed-row pyarrow Table."""
    cols = REQUIRED_COLUMNS
    part = table.take(list(indices)).select(cols)
    rows: list[dict[str, np.ndarray]] = [{} for _ in range(part.num_rows)]
    for c in cols:
        col = part.column(c).combine_chunks()
        off = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
        for i, row in enumerate(rows):
            row[c] = values[off[i] : off[i + 1]]
    return collate(rows, layout)


def reference_loss_sum(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, **attn_kwargs
) -> torch.Tensor:
    """Sum of next-token CE over trained tokens of packed rows [B, T] (fp32 logits)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False, **attn_kwargs)
    logits = out.logits[:, :-1, :].float()  # [B, T-1, V]
    target = labels[:, 1:]  # [B, T-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def chunked_by_default(device: torch.device) -> bool:
    """Whether a run without train.kernels takes the chunked loss: on GPUs, where full logits cost
    gigabytes; not on CPUs, where the PyTorch chunks measured slower than full logits (BENCHMARKS.md)."""
    return device.type == "cuda"


_FULL_LOGITS_BECAUSE: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


def _chunked_fits(model: torch.nn.Module) -> bool:
    """The chunked loss can compute this model's loss; when not, say why once (the run then takes full logits)."""
    if model not in _FULL_LOGITS_BECAUSE:
        from raysft.kernels.causal_lm_loss import chunked_loss_blocker  # heavy: torch + the optional triton

        reason = chunked_loss_blocker(model)
        _FULL_LOGITS_BECAUSE[model] = reason
        if reason is not None:
            logging.getLogger(__name__).warning("the loss computes full logits: %s", reason)
    return _FULL_LOGITS_BECAUSE[model] is None


def loss_sum(model, mb: MicroBatch, kernels: bool = False) -> torch.Tensor:
    """Summed CE of one micro-batch without full logits where it can: the kernels' fused loss with
    train.kernels; else its PyTorch chunks by default on GPUs (`chunked_by_default`) when lm_head allows;
    else the full-logits reference."""
    if kernels or (chunked_by_default(mb.input_ids.device) and _chunked_fits(model)):
        from raysft.kernels import causal_lm_loss_sum  # heavy: torch + the optional triton

        return causal_lm_loss_sum(
            model,
            mb.input_ids,
            mb.position_ids,
            mb.labels,
            trained_index=mb.trained_index,
            triton=None if kernels else False,
            **mb.attn_kwargs,
        )
    return reference_loss_sum(model, mb.input_ids, mb.position_ids, mb.labels, **mb.attn_kwargs)


class StepEngine(Protocol):
    """What a step needs from the thing that owns the model and optimizer (DeepSpeed engine or plain torch)."""

    def forward_model(self) -> torch.nn.Module: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def micro_step(self) -> None: ...
    def finish_step(self) -> torch.Tensor | float | None: ...  # the grad norm; a tensor stays on the device
    def lr(self) -> float: ...


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's summed CE, on the device (divide the all-rank sum by n_global)
    n_global: int
    tokens: int  # this rank's tokens (all, not only trained)
    norm: torch.Tensor | float | None  # the grad norm as the engine gave it
    lr: float
    seconds: float  # host time to queue the step (the loop's one host sync comes after it)

    @property
    def loss_sum(self) -> float:
        return float(self.loss)  # a host sync: the loop reads it with the step's other numbers instead

    @property
    def grad_norm(self) -> float:
        return float(self.norm) if self.norm is not None else float("nan")


def optimizer_step(
    engine: StepEngine,
    micro_batches: Sequence[MicroBatch],
    n_global: int,
    *,
    grad_scale: float = 1.0,
    kernels: bool = False,
    device: torch.device | str | None = None,
) -> StepResult:
    """Forward/backward every micro-batch with loss = sum / n_global * grad_scale, then one update.

    `grad_scale` undoes the averaging the engine applies: DeepSpeed/DDP average gradients over
    the data-parallel ranks, so it is world_size there (and 1 with `TorchEngine`).
    No host sync here: the loss sum and the grad norm stay on the device (ARCHITECTURE.md, "One host sync").
    """
    start = time.perf_counter()
    lr = engine.lr()  # the rate this update uses (the schedule advances inside finish_step)
    model = engine.forward_model()
    model.train()
    total: torch.Tensor | None = None
    tokens = 0
    scale = grad_scale / max(n_global, 1)
    for mb in micro_batches:
        if device is not None:
            mb = mb.to(device)
        s = loss_sum(model, mb, kernels)
        engine.backward(s * scale)
        engine.micro_step()
        total = s.detach().float() if total is None else total + s.detach().float()
        tokens += mb.n_tokens
    grad_norm = engine.finish_step()
    if total is None:
        total = torch.zeros((), device=device)
    return StepResult(total, n_global, tokens, grad_norm, lr, time.perf_counter() - start)


@torch.no_grad()
def eval_loss_sum(
    model,
    micro_batches: Sequence[MicroBatch],
    weights: Sequence[float] | None = None,
    kernels: bool = False,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """(summed CE, trained tokens) over eval micro-batches; weight 0 runs a forward that counts nothing."""
    was_training = model.training
    model.eval()
    total: torch.Tensor | float = 0.0
    n = 0
    for i, mb in enumerate(micro_batches):
        w = 1.0 if weights is None else weights[i]
        if device is not None:
            mb = mb.to(device)
        total = total + w * loss_sum(model, mb, kernels).float()  # on the device: one sync at the end
        n += int(w) * mb.n_trained
    model.train(was_training)
    return float(total), n


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `step` updates: linear warmup, then cosine/linear decay or constant."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def warmup_steps(tcfg, total_steps: int) -> int:
    return tcfg.warmup_steps if tcfg.warmup_steps is not None else int(round(tcfg.warmup_ratio * total_steps))


def make_optimizer(model: torch.nn.Module, tcfg, total_steps: int):
    """AdamW over the trainable (LoRA) parameters and its warmup + decay schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(tcfg.scheduler, warmup_steps(tcfg, total_steps), total_steps)
    )
    return opt, sched


class TorchEngine:
    """Plain-torch StepEngine (one process, no DeepSpeed): clip, AdamW step, schedule, zero grads."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float = 1.0):
        self.model, self.optimizer, self.scheduler, self.max_grad_norm = model, optimizer, scheduler, max_grad_norm

    def forward_model(self) -> torch.nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step(self) -> None:
        pass

    def finish_step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
