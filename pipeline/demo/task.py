"""The demo's task: rewrite an ISO date as "day month-name year", with one exact answer per prompt.

    >>> make_example(random.Random(0))
    ('Rewrite 2038-04-01 as day, month name and year.', '1 April 2038')

Why this task: answers can be checked exactly (string equality), SmolLM2-135M-Instruct gets the
format wrong out of the box (it echoes the ISO date), and the rule (drop the leading zero, name
the month, reorder) is learnable from a few hundred short examples, i.e. minutes of QLoRA on CPU.
Rows are generated deterministically from a seed, in the `messages` format; train and eval dates
never overlap.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from pathlib import Path

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
PROMPTS = (
    "Write the date {iso} as day, month name and year.",
    "Rewrite {iso} as day, month name and year.",
    "Convert the date {iso} to day, month name and year.",
)
FIRST_DAY = dt.date(1900, 1, 1)
N_DAYS = (dt.date(2099, 12, 31) - FIRST_DAY).days + 1


def answer_for(date: dt.date) -> str:
    """The one correct answer: '4 August 2001' (no leading zero, English month name)."""
    return f"{date.day} {MONTHS[date.month - 1]} {date.year}"


def prompt_for(date: dt.date, variant: int = 0) -> str:
    return PROMPTS[variant % len(PROMPTS)].format(iso=date.isoformat())


def make_example(rng: random.Random) -> tuple[str, str]:
    date = FIRST_DAY + dt.timedelta(days=rng.randrange(N_DAYS))
    return prompt_for(date, rng.randrange(len(PROMPTS))), answer_for(date)


def generate(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`messages` rows for train and eval; every date is used at most once across both."""
    rng = random.Random(seed)
    days = rng.sample(range(N_DAYS), n_train + n_eval)
    rows = []
    for day in days:
        date = FIRST_DAY + dt.timedelta(days=day)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt_for(date, rng.randrange(len(PROMPTS)))},
                    {"role": "assistant", "content": answer_for(date)},
                ]
            }
        )
    return rows[:n_train], rows[n_train:]


def write_task(directory: str | os.PathLike, n_train: int = 1200, n_eval: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl into `directory`; the same seed always writes the same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, evals = generate(n_train, n_eval, seed)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, rows in zip(paths, (train, evals)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def normalise_answer(text: str) -> str:
    """What the checker compares: the reply with surrounding whitespace and a final period removed."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def is_correct(reply: str, answer: str) -> bool:
    """Exact match after `normalise_answer` (case and inner spacing must match)."""
    return normalise_answer(reply) == answer
