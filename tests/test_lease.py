"""One writer per folder (pipeline/lease.py) on a local folder: refusal naming the holder, a killed holder's
lease taken over, a holder elsewhere taken over only once it stops renewing, one winner among many takers.
The same scenarios on S3 are in test_storage_s3.py; a real `raysft train` refused and taking over, in
test_fault_sentences.py."""

from __future__ import annotations

import os
import time

import lease_probes
import pytest

from raysft.pipeline import lease
from raysft.pipeline.data import plan
from raysft.pipeline.errors import RunInUseError
from raysft.pipeline.storage import StorageOptions


def test_refused_then_taken_over_from_a_killed_process(tmp_path, capfd):
    lease_probes.refused_by_and_taken_over_from_a_killed_process(
        lease.in_folder(tmp_path / "run"), StorageOptions(), capfd
    )


def test_holder_elsewhere_taken_over_once_it_stops_renewing(tmp_path):
    where = lease.in_folder(tmp_path / "run")

    def expire() -> None:
        old = time.time() - 10
        os.utime(where, (old, old))

    lease_probes.elsewhere_refused_while_renewed_then_taken_over(where, StorageOptions(), expire)


def test_one_of_many_takers_wins(tmp_path):
    lease_probes.one_of_many_takers_wins(lease.in_folder(tmp_path / "run"), StorageOptions())


def test_renewal_keeps_a_short_lease(tmp_path):
    lease_probes.renewal_keeps_a_short_lease(lease.in_folder(tmp_path / "run"), StorageOptions())


def test_unreadable_lease_is_taken_over(tmp_path, capfd):
    where = lease.in_folder(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    open(where, "w").write("{half a lea")
    lease.acquire(where, "The run folder", StorageOptions()).release()
    assert "taking over The run folder from an unreadable lease" in capfd.readouterr().err
    assert not os.path.exists(where)


def test_a_second_prepare_into_one_output_is_refused(tmp_path):
    """prepare --output takes a lease beside the folder (the folder is swapped in whole when done), before it reads
    any input."""
    from raysft.pipeline.config import load_config

    out = tmp_path / "prepared"
    cfg = load_config(None, {"data.train": str(tmp_path / "none.jsonl")})
    with lease.hold(lease.beside(out), f"--output {out}"):
        with pytest.raises(RunInUseError, match=rf"^--output {out} is in use by raysft on host "):
            plan.prepare(cfg, output=out, use_ray=False)
    assert lease.beside(out) == str(tmp_path / ".prepared.raysft-lease.json")
    assert not out.exists()
