"""Before/after evaluation for the demo: eval loss on held-out rows and exact-match task accuracy.

Both numbers come from the same base model the run trains on (NF4 when the config says so), with
or without the run's adapter, so "before" and "after" differ only by the adapter. The loss uses
the project's own tokenization (response-only labels) and the training step's loss function;
accuracy uses greedy decoding of held-out prompts and `demo_task.is_correct`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from raysft.pipeline.config import Config
from raysft.pipeline.data.encode import ChatEncoder
from raysft.pipeline.data.formats import normalise_row
from raysft.pipeline.demo import task as demo_task
from raysft.pipeline.models.load import load_base_model
from raysft.pipeline.models.tokenizer import load_tokenizer
from raysft.pipeline.training.generate_eval import Prompt, generate
from raysft.pipeline.training.step import collate, eval_loss_sum


@dataclass
class EvalResult:
    eval_loss: float
    eval_tokens: int
    accuracy: float
    correct: int
    total: int
    seconds: float
    samples: list[dict[str, str]] = field(default_factory=list)  # a few prompts, replies and answers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(cfg: Config, adapter: str | os.PathLike | None = None):
    """The configured base (NF4 or plain, no gradient checkpointing) with the adapter when given, in eval mode."""
    model = load_base_model(cfg.model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tokenizer = load_tokenizer(cfg)
    return model, tokenizer


@torch.no_grad()
def eval_loss(
    model, tokenizer, rows: list[dict], system_prompt: str | None = None, tokens_per_batch: int = 1024
) -> tuple[float, int]:
    """Mean next-token CE over response tokens of `rows` (packed, samples kept apart by position_ids)."""
    encoded = ChatEncoder(tokenizer).encode([normalise_row(r, system_prompt=system_prompt) for r in rows])
    packed: list[list[dict]] = [[]]
    size = 0
    for item in encoded:
        if isinstance(item, Exception):
            continue
        ids, labels = item
        if packed[-1] and size + len(ids) > tokens_per_batch:
            packed.append([])
            size = 0
        packed[-1].append({"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": list(range(len(ids)))})
        size += len(ids)
    # Each sample is its own row for collate (its first token is never a target, as in training).
    batches = [collate(group) for group in packed if group]
    total, n = eval_loss_sum(model, batches)
    return total / max(n, 1), n


def generate_replies(
    model,
    tokenizer,
    prompts: list[str],
    system_prompt: str | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy replies to single-turn user prompts (training/generate_eval.generate, in batches)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    replies: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = [Prompt(system + [{"role": "user", "content": p}], "") for p in prompts[i : i + batch_size]]
        replies += generate(model, tokenizer, batch, max_new_tokens, batch_size)
        if progress:
            print(f"  generated {len(replies)}/{len(prompts)} replies", flush=True)
    return replies


def evaluate(
    cfg: Config,
    eval_rows: list[dict],
    adapter: str | os.PathLike | None = None,
    max_new_tokens: int = 12,
    n_shown: int = 3,
) -> EvalResult:
    """Eval loss and exact-match accuracy of the base (+ adapter) on the held-out demo rows."""
    start = time.perf_counter()
    model, tokenizer = load_model(cfg, adapter)
    system = cfg.data.system_prompt
    loss, n_tokens = eval_loss(model, tokenizer, eval_rows, system)
    print(
        f"  eval loss {loss:.4f} over {n_tokens} response tokens; greedy decoding {len(eval_rows)} prompts", flush=True
    )
    prompts = [r["messages"][0]["content"] for r in eval_rows]
    answers = [r["messages"][-1]["content"] for r in eval_rows]
    replies = generate_replies(model, tokenizer, prompts, system, max_new_tokens=max_new_tokens, progress=True)
    hits = [demo_task.is_correct(r, a) for r, a in zip(replies, answers)]
    shown = [
        {"prompt": p, "reply": r.strip(), "answer": a} for p, r, a in list(zip(prompts, replies, answers))[:n_shown]
    ]
    del model
    return EvalResult(
        loss, n_tokens, sum(hits) / max(len(hits), 1), sum(hits), len(hits), time.perf_counter() - start, shown
    )
