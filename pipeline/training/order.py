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

from raysft.pipeline.errors import DataError


@dataclass(frozen=True)
class StepPlan:
    n_rows: int
    world_size: int
    grad_accum: int
    micro_batch_size: int
    seed: int
    max_steps: int | None = None
    epochs: int = 1

    @classmethod
    def from_config(cls, cfg, n_rows: int, world_size: int | None = None) -> "StepPlan":
        """The plan of `cfg` (train.* and scaling.num_workers, unless `world_size` says otherwise) over `n_rows`."""
        t = cfg.train
        world = cfg.scaling.num_workers if world_size is None else world_size
        return cls(n_rows, world, t.grad_accum, t.micro_batch_size, t.seed, t.max_steps, t.epochs)

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.grad_accum * self.micro_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.rows_per_step

    def require_a_step(self) -> "StepPlan":
        """This plan, or a one-sentence DataError when the data cannot fill a single optimizer step."""
        if self.steps_per_epoch == 0:
            raise DataError(
                f"Prepared train data has {self.n_rows} packed rows, fewer than one optimizer step needs "
                f"(scaling.num_workers x train.grad_accum x train.micro_batch_size = {self.rows_per_step})."
            )
        return self

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
