"""One QLoRA optimizer step on packed rows, with plain torch: no Ray, no DeepSpeed needed.

The Ray loop drives it through a DeepSpeed engine; a GPU benchmark drives it with `TorchEngine`.

Correctness by construction (DESIGN.md):
- a micro-batch is its packed rows flattened into ONE [1, T] sequence, no padding; the forward gets
  `attention_mask=None`, the rows' `position_ids` (restarts at 0 keep samples apart) and
  `use_cache=False` (with a cache, packed samples attend to each other);
- the loss of a step is sum(CE over trained tokens) / N, N = trained tokens of the WHOLE step
  (all micro-batches, all ranks), so the update does not depend on how the step is split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from raysft.pipeline.data.schema import IGNORE_INDEX



@dataclass
class MicroBatch:
    """Packed rows flattened to one sequence: tensors are [1, T]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    n_trained: int  # tokens that carry loss (shifted labels != -100)
    source_ids: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device),
                          self.n_trained, self.source_ids)


def trained_tokens(labels: Sequence[int]) -> int:
    """Tokens of one packed row that carry loss; position 0 has nothing before it to predict from."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def collate(rows: Sequence[Mapping[str, Any]]) -> MicroBatch:
    """Concatenate packed rows (dicts with input_ids, labels, position_ids[, source_ids]) into one [1, T] batch."""
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []
    src: list[int] = []
    n = 0
    for row in rows:
        ids.extend(row["input_ids"])
        pos.extend(row["position_ids"])
        labels = list(row["labels"])
        # The first token of a row starts a sample: nothing in this row predicts it.
        if labels:
            labels[0] = IGNORE_INDEX
        lab.extend(labels)
        n += trained_tokens(labels)
        src.extend(row.get("source_ids") or [])
    t = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731  [1, T]
    return MicroBatch(t(ids), t(pos), t(lab), n, src)


def reference_loss_sum(model, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE over trained tokens of a [1, T] packed batch (fp32 logits)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # [1, T-1, V]
    target = labels[:, 1:]  # [1, T-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def loss_sum(model, mb: MicroBatch, kernels: bool = False) -> torch.Tensor:
    """Summed CE of one micro-batch, through the opt-in kernels or the reference."""
    if kernels:
        from raysft.kernels import causal_lm_loss_sum

        return causal_lm_loss_sum(model, mb.input_ids, mb.position_ids, mb.labels)
    return reference_loss_sum(model, mb.input_ids, mb.position_ids, mb.labels)


class StepEngine(Protocol):
    """What a step needs from the thing that owns the model and optimizer (DeepSpeed engine or plain torch)."""

    def forward_model(self) -> torch.nn.Module: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def micro_step(self) -> None: ...
    def finish_step(self) -> float: ...
    def lr(self) -> float: ...


@dataclass
class StepResult:
    loss_sum: float  # this rank's summed CE (divide the all-rank sum by n_global for the step loss)
    n_global: int
    tokens: int  # this rank's tokens (all, not only trained)
    grad_norm: float
    lr: float
    seconds: float


def optimizer_step(engine: StepEngine, micro_batches: Sequence[MicroBatch], n_global: int, *,
                   grad_scale: float = 1.0, kernels: bool = False, device: torch.device | str | None = None) -> StepResult:
    """Forward/backward every micro-batch with loss = sum / n_global * grad_scale, then one update.

    `grad_scale` undoes the averaging the engine applies: DeepSpeed/DDP average gradients over
    the data-parallel ranks, so it is world_size there (and 1 with `TorchEngine`).
    """
    start = time.perf_counter()
    lr = engine.lr()  # the rate this update uses (the schedule advances inside finish_step)
    model = engine.forward_model()
    model.train()
    total = 0.0
    tokens = 0
    denom = max(n_global, 1)
    for mb in micro_batches:
        if device is not None:
            mb = mb.to(device)
        s = loss_sum(model, mb, kernels)
        engine.backward(s * (grad_scale / denom))
        engine.micro_step()
        total += float(s.detach())
        tokens += mb.n_tokens
    grad_norm = engine.finish_step()
    return StepResult(total, n_global, tokens, grad_norm, lr, time.perf_counter() - start)


@torch.no_grad()
def eval_loss_sum(model, micro_batches: Sequence[MicroBatch], weights: Sequence[float] | None = None,
                  kernels: bool = False, device: torch.device | str | None = None) -> tuple[float, int]:
    """(summed CE, trained tokens) over eval micro-batches; weight 0 runs a forward that counts nothing."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, mb in enumerate(micro_batches):
        w = 1.0 if weights is None else weights[i]
        if device is not None:
            mb = mb.to(device)
        s = float(loss_sum(model, mb, kernels))
        total += w * s
        n += int(w) * mb.n_trained
    model.train(was_training)
    return total, n


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg.scheduler, warmup_steps(tcfg, total_steps), total_steps))
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

    def finish_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
