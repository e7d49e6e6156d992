"""Shared fixtures: tiny models/tokenizers built locally, one Ray instance per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import raysft.pipeline  # noqa: F401 - installs the import guard: `python -m pytest` puts the checkout root on sys.path

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import tiny`

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this checkout has none (users who clone the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """../shared/tokenizers (real Llama-3.1, Qwen2.5, Qwen3, Mistral v0.3 tokenizers), or skip when absent."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"real tokenizers not present at {SHARED_TOKENIZERS}")
    return SHARED_TOKENIZERS


@pytest.fixture(scope="session")
def chatml_tokenizer():
    from tiny import build_tokenizer

    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from tiny import build_tokenizer

    return build_tokenizer("llama3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + ChatML tokenizer saved in Hugging Face format."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_chatml"), "chatml")


@pytest.fixture(scope="session")
def tiny_llama3_model_dir(tmp_path_factory) -> Path:
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama3"), "llama3")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (logical oversubscription, as Ray's tests do)."""
    import ray

    from raysft.pipeline import ray_runtime

    needs = ray_runtime.Needs(dashboard=True, log_to_driver=False, train=True)
    ray_runtime.start("local", needs, num_cpus=4, env={"HF_HUB_OFFLINE": "1"})
    yield ray
    ray_runtime.stop()


_HEADS: list = []  # the shared head while it runs
_LAST_HEAD_USER: list[str] = []  # the node id of the last test (in run order) that asks for it


@pytest.fixture
def ray_head():
    """One local Ray head (`ray start --head`, token authentication; local_processes.start_head) for the tests that
    submit jobs to it (test_storage_s3's last test, then test_submit): one `ray start` instead of one per module.
    Started on first use and stopped right after the last test that uses it, not at the session's end: idle, a head
    costs about 4 CPU-s a minute (BENCHMARKS.md), so only tests that run close together should share it. A user that
    runs after that (another order) starts a new one."""
    if not _HEADS:
        from local_processes import start_head

        _HEADS.append(start_head())
    return _HEADS[0]


def pytest_collection_finish(session):
    users = [item.nodeid for item in session.items if "ray_head" in getattr(item, "fixturenames", ())]
    _LAST_HEAD_USER[:] = users[-1:]


def pytest_runtest_teardown(item, nextitem):
    if _HEADS and (nextitem is None or item.nodeid in _LAST_HEAD_USER):
        _HEADS.pop().stop()


def pytest_sessionfinish(session):
    while _HEADS:
        _HEADS.pop().stop()


@pytest.fixture(scope="session")
def _mlflow_server_of_the_session(tmp_path_factory):
    from tracking_fixtures import MlflowServer, free_port

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_port())
    yield server
    server.stop()


def _running(server):
    from tracking_fixtures import free_port

    if server.proc is None or server.proc.poll() is not None:
        server.port = free_port()
        server.start()
    return server


@pytest.fixture(scope="module")
def mlflow_server(_mlflow_server_of_the_session):
    """A real MLflow tracking server (sqlite backend) shared by the session: started on first use, and started
    again (same database, new port) for a module when an earlier test stopped it."""
    return _running(_mlflow_server_of_the_session)


@pytest.fixture(scope="session")
def sweep_storage(tmp_path_factory) -> Path:
    """The run.storage_path of the shared sweep; test_tracking trains its runs there too (`raysft runs` lists all)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def shared_sweep(ray_session, tiny_model_dir, sweep_storage, _mlflow_server_of_the_session, tmp_path_factory):
    """The suite's one Ray Tune grid sweep (sweep_fixtures.run_shared_sweep), run on first use and checked by the
    sweep tests of test_tune, test_tracking and test_generate_eval."""
    from sweep_fixtures import run_shared_sweep

    server = _running(_mlflow_server_of_the_session)
    return run_shared_sweep(tmp_path_factory.mktemp("sweepdata"), sweep_storage, tiny_model_dir, server.uri)


# ---------------------------------------------------------------- two lanes under `make test` (pytest -n 2)
# `make test` runs the suite on two pytest-xdist workers. The Ray lane runs every test on the session's Ray instance
# (`ray_session`, `ray_head`, `shared_sweep`), one after the other as before, and the 2-node and recovery modules.
# The side lane runs the modules below beside it: CPU-only work (kernels, engines on gloo, exports, data) and
# commands that start and stop their own short-lived local Ray in a subprocess (fault sentences, the demo, the
# import guard's workers, the storage cluster), which never touch the session's instance; two local Ray instances
# at once are independent (their own ports and session folders). A module not listed runs in the Ray lane (the safe
# default); a listed one that asks for the session's Ray stops the collection, and so does a listed single test
# that no longer exists. (xdist's own `--dist loadgroup`
# cannot do this on pytest 9: it renames node ids through an attribute pytest 9 no longer reads, so the groups are
# silently ignored.)
SIDE_LANE = frozenset(
    {
        # CPU only
        "test_architecture", "test_checkpoint_safety", "test_chunked_loss", "test_cluster_manifests", "test_config",
        "test_console", "test_data_families", "test_data_fast_bpe", "test_data_hostile_inputs", "test_data_masks",
        "test_data_mix", "test_data_pack", "test_data_sources", "test_docs", "test_doctests", "test_examples",
        "test_export", "test_fetch", "test_gpu_acceptance", "test_gpu_path", "test_kernels_bf16", "test_kernels_memory",
        "test_kernels_model", "test_kernels_numerics", "test_layers", "test_model", "test_model_source", "test_outputs",
        "test_package", "test_precision", "test_preemption", "test_run_identity", "test_shards_reader", "test_step",
        "test_submit_package",
        # their own local Ray, in a subprocess
        "test_cluster_storage", "test_demo", "test_fault_sentences", "test_import_guard",
        # single tests of Ray-lane modules, the same kind (no wall-clock bound either)
        "test_tune::test_asha_stops_the_bad_learning_rate_and_an_interrupted_sweep_resumes",
        "test_ray_runtime::test_unset_address_starts_its_own_instance_never_the_recorded_one",
        "test_ray_runtime::test_the_watchdog_kills_what_carries_a_finished_owners_marker",
        "test_ray_runtime::test_temp_folders_older_than_a_day_are_removed",
        "test_ray_runtime::test_sigkill_during_prepare_leaves_no_orphans_after_the_next_run",
        "test_ray_runtime::test_auto_joins_the_cluster_ray_start_recorded",
    }
)  # fmt: skip
SESSION_RAY_FIXTURES = frozenset({"ray_session", "ray_head", "shared_sweep"})
# Ray-lane modules with wall-clock bounds (recovery within N s) run last, when the side lane has finished.
RAY_LANE_LAST = ("test_cluster_drain", "test_cluster_multinode", "test_ray_runtime")


def lane(nodeid: str) -> str:
    """'side' or 'ray': the pytest-xdist worker a test runs on (by its module, or module::function)."""
    module, function = _names(nodeid)
    return "side" if module in SIDE_LANE or f"{module}::{function}" in SIDE_LANE else "ray"


def _names(nodeid: str) -> tuple[str, str]:
    """(module stem, test function without parameters) of a node id."""
    parts = nodeid.split("::")
    return Path(parts[0]).stem, parts[1].split("[")[0] if len(parts) > 1 else ""


def pytest_collection_modifyitems(config, items):
    misplaced = [
        item.nodeid
        for item in items
        if lane(item.nodeid) == "side" and SESSION_RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if misplaced:
        raise pytest.UsageError(f"{misplaced[0]} uses the session's Ray: it must leave SIDE_LANE (conftest.py)")
    collected = {"::".join(_names(item.nodeid)) for item in items}
    modules = {name.split("::")[0] for name in collected}
    gone = [name for name in SIDE_LANE if "::" in name and name.split("::")[0] in modules and name not in collected]
    if gone:
        raise pytest.UsageError(f"SIDE_LANE (conftest.py) names {gone[0]}, which is not a test any more")
    items.sort(key=lambda item: _names(item.nodeid)[0] in RAY_LANE_LAST)  # stable sort


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config, log):
    """Under `-n 2`: each lane is one unit of work, so each runs whole on one worker, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class TwoLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return TwoLanes(config, log)
