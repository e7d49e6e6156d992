"""The distribution: every subpackage and the package data ship, and an installed (non-editable) copy runs.

The wheel test builds raysft from a copy of the sources, installs it with --no-deps into a fresh virtualenv
that sees this environment's dependencies through a .pth file, and runs it from outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
HALVES = {"raysft.pipeline": "pipeline", "raysft.kernels": "kernels"}  # import package -> source folder


def subpackages_on_disk() -> set[str]:
    """Every folder of pipeline/ and kernels/ with an __init__.py, as its import name."""
    found = set()
    for name, folder in HALVES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    return found


def modules_on_disk() -> set[str]:
    """Every .py file of pipeline/ and kernels/, as its path inside the wheel."""
    return {
        f"raysft/{p.relative_to(REPO).as_posix()}"
        for folder in HALVES.values()
        for p in (REPO / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_pyproject_lists_every_subpackage_and_maps_the_two_halves():
    assert SETUPTOOLS["package-dir"] == HALVES
    listed = set(SETUPTOOLS["packages"])
    missing, extra = subpackages_on_disk() - listed, listed - subpackages_on_disk()
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
    assert not extra, f"pyproject.toml [tool.setuptools] packages names {sorted(extra)}, which have no __init__.py"


def test_examples_demo_yaml_is_the_package_copy():
    from raysft.pipeline.demo.run import DEMO_CONFIG

    assert DEMO_CONFIG.resolve() == (REPO / "pipeline" / "demo" / "demo.yaml").resolve()
    assert (REPO / "examples" / "demo.yaml").read_bytes() == DEMO_CONFIG.read_bytes(), (
        "examples/demo.yaml must be a byte-identical copy of pipeline/demo/demo.yaml (the package data)"
    )


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for folder in HALVES.values():
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("raysft-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "raysft/pipeline/demo/demo.yaml" in names
    missing = sorted(modules_on_disk() - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("tests/", "examples/", "cluster/", "raysft/__init__")) for n in names), sorted(names)

    # A fresh virtualenv; the wheel goes in before the dependencies become visible, so pip sees no other raysft.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp_path,
    )
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], cwd=tmp_path).strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}  # this environment's dependencies
    (site / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    away = tmp_path / "elsewhere"  # no raysft source on sys.path: not the repository, not a shim
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    help_text = _run([str(venv / "bin" / "raysft"), "demo", "--help"], cwd=away, env=env)
    assert "usage: raysft demo" in help_text and "--output" in help_text

    probe = (
        "import raysft.pipeline, raysft.kernels\n"
        "from pathlib import Path\n"
        "from raysft.pipeline.demo.run import DEMO_CONFIG, demo_config\n"
        "cfg = demo_config('/models/m', Path('/d'), Path('/out'), 'run-x')\n"
        "print(raysft.pipeline.__file__); print(raysft.kernels.__file__); print(DEMO_CONFIG)\n"
        "print(cfg.model.name_or_path, cfg.data.train, cfg.run.name, cfg.lora.r, cfg.train.max_steps)\n"
    )
    pipeline_init, kernels_init, demo_config_path, loaded = _run(
        [str(python), "-c", probe], cwd=away, env=env
    ).splitlines()
    for path in (pipeline_init, kernels_init, demo_config_path):
        assert Path(path).resolve().is_relative_to(site.resolve()), f"{path} is not the installed copy in {site}"
    assert Path(demo_config_path).read_bytes() == (REPO / "pipeline" / "demo" / "demo.yaml").read_bytes()
    from raysft.pipeline.config import load_config

    expected = load_config(REPO / "pipeline" / "demo" / "demo.yaml")
    assert loaded.split() == [
        "/models/m",
        "/d/train.jsonl",
        "run-x",
        str(expected.lora.r),
        str(expected.train.max_steps),
    ]
