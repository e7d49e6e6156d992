"""PyPI's `kernels` wins over the checkout's `kernels/` folder, in the driver and in every Ray worker.

transformers >= 5.25 requires PyPI's `kernels` and imports it from `transformers.activations`; Ray puts the driver's
working directory first on every worker's sys.path, so from the checkout root a worker found our folder instead
(`ImportError: cannot import name 'CUDAProperties'`). The guard (pipeline/import_guard.py) is installed by
`raysft.pipeline` and as the workers' setup hook by `ray_runtime`. The Ray script below defines its task and its
train loop in `__main__`, so the workers never import raysft themselves: only the setup hook protects them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke  # in `make test-latest`'s canary subset

REPO = Path(__file__).resolve().parents[1]

RAY_SCRIPT = r"""
import json, sys
from raysft.pipeline import ray_runtime

MODEL, OUT = sys.argv[1], sys.argv[2]

def forward_here():
    import os, sys
    import torch
    import transformers.activations  # the import that failed: transformers imports PyPI's `kernels` here
    import kernels
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]]), use_cache=False).logits
    return {"kernels": kernels.__file__, "sys_path": list(sys.path),
            "finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape)}

ray_runtime.start("local", ray_runtime.TRAIN, num_cpus=2)
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

task = ray.get(ray.remote(forward_here).remote())

def loop(config):  # Result.metrics keeps only metrics reported with a checkpoint: the worker writes a file
    with open(OUT + "/worker.json", "w") as f:
        json.dump(forward_here(), f)

trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                       torch_config=TorchConfig(backend="gloo"),
                       run_config=RunConfig(storage_path=OUT, name="guard"))
trainer.fit()
ray_runtime.stop()
print("RESULT " + json.dumps({"task": task, "worker": json.load(open(OUT + "/worker.json"))}))
"""


def _run_from(cwd: Path, model_dir: Path, storage: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run(
        [sys.executable, "-c", RAY_SCRIPT, str(model_dir), str(storage)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"from {cwd}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _requires_kernels() -> bool:
    reqs = importlib.metadata.requires("transformers") or []
    return any(r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r for r in reqs)


def test_the_pinned_transformers_requires_pypi_kernels():
    """The situation the guard is for is the one CI installs (the lock pins transformers 5.25 and kernels)."""
    assert _requires_kernels(), "transformers no longer requires PyPI's kernels: this module's Ray test guards nothing"
    assert importlib.metadata.version("kernels")


def test_driver_from_the_checkout_root_imports_pypi_kernels():
    code = "import raysft.pipeline, transformers.activations, kernels; print(kernels.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert "site-packages" in out and str(REPO / "kernels") not in out


def test_guard_leaves_other_imports_and_user_folders_alone(tmp_path):
    """A user's own `kernels` folder outside a raysft checkout is theirs to import."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MINE = True\n")
    code = "import raysft.pipeline, kernels; print(getattr(kernels, 'MINE', False))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr


def test_the_setup_hook_imports_only_the_standard_library():
    """Every Ray worker raysft starts runs the hook first (data-plan actors, Ray Train's own actors): importing it
    must not load pydantic, pyarrow, yaml or numpy (0.2-0.4 s of CPU per process), and the API still loads lazily."""
    module, func = __import__("raysft.pipeline.import_guard").pipeline.import_guard.HOOK.rsplit(".", 1)
    code = (
        "import importlib, json, sys; before = set(sys.modules)\n"
        f"getattr(importlib.import_module({module!r}), {func!r})()\n"
        "new = sorted(set(sys.modules) - before)\n"
        "from raysft.pipeline import Config, ConfigError, load_config\n"  # prepare/train/tune: torch and Ray, not here
        "print(json.dumps({'new': new, 'api': [Config.__name__, load_config.__module__, ConfigError.__module__]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    third_party = sorted(
        {m.split(".")[0] for m in got["new"]} - set(sys.stdlib_module_names) - {"raysft", "_virtualenv"}
    )
    assert third_party == [], f"the setup hook imported {third_party}"
    assert sorted(m for m in got["new"] if m.startswith("raysft.")) == [
        "raysft.pipeline",
        "raysft.pipeline.errors",
        "raysft.pipeline.import_guard",
    ]
    assert got["api"] == ["Config", "raysft.pipeline.config", "raysft.pipeline.errors"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("where", ["checkout_root", "outside"])
def test_ray_task_and_train_worker_load_a_model(where, tiny_model_dir, tmp_path):
    cwd = REPO if where == "checkout_root" else tmp_path
    (tmp_path / "runs").mkdir()
    result = _run_from(cwd, tiny_model_dir, tmp_path / "runs")
    for who in ("task", "worker"):
        got = result[who]
        assert "site-packages" in got["kernels"], f"{who} from {where} imported {got['kernels']}"
        assert got["finite"] and got["shape"][:2] == [1, 4]
        # Ray put the driver's working directory on the worker's path: from the root, the folder was findable.
        assert (str(REPO) in got["sys_path"]) == (where == "checkout_root")
