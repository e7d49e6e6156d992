"""The global data order: which packed rows each rank trains in each optimizer step.

Deterministic and resumable by construction: a seeded permutation per epoch defines the order,
step s of an epoch takes the next world_size x grad_accum x micro_batch_size rows, and rank r takes
its fixed slice. Rows that cannot fill a whole step are left out of that epoch (counted, so the
ledger check knows them). Every rank computes the same plan from the same table, so it also knows
the trained-token count of the whole step without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepPlan:
    n_rows: int
    world_size: int
    grad_accum: int
    micro_batch_size: int
    seed: int
    max_steps: int | None = None
    epochs: int = 1

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.grad_accum * self.micro_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.rows_per_step

    @property
    def left_out_per_epoch(self) -> int:
        return self.n_rows - self.steps_per_epoch * self.rows_per_step

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def step_rows(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, rows[grad_accum, world_size, micro_batch_size]) for 0-based global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        rows = self.permutation(epoch)[i * self.rows_per_step:(i + 1) * self.rows_per_step]
        return epoch, rows.reshape(self.grad_accum, self.world_size, self.micro_batch_size)

    def kept_rows(self, epoch: int) -> np.ndarray:
        return self.permutation(epoch)[: self.steps_per_epoch * self.rows_per_step]
