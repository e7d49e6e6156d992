"""Every example is runnable as written: YAMLs start with their command and validate; scripts compile and import."""

from __future__ import annotations

import importlib.util
import py_compile
import shlex
from pathlib import Path

import pytest

from raysft.pipeline.cli import build_parser
from raysft.pipeline.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def _command(path: Path) -> list[str]:
    """The command on the file's first line: '# raysft ...' or '# python ...'."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must start with a comment giving the command that runs it"
    return shlex.split(first[2:])


def test_the_expected_examples_exist():
    names = {p.name for p in YAMLS} | {p.name for p in SCRIPTS}
    assert {"demo.yaml", "gpu_single_node.yaml", "multinode_zero3.yaml", "api_prepare_train.py"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_starts_with_its_command_and_validates(path):
    cmd = _command(path)
    assert cmd[0] == "raysft", f"{path.name}: the first line should be a raysft command, not {cmd[0]!r}"
    args = build_parser().parse_args(cmd[1:])  # a real subcommand with valid flags (argparse exits otherwise)
    if hasattr(args, "config"):
        assert Path(args.config).name == path.name, f"{path.name}: its command runs {args.config}"
        overrides = args.overrides
    else:
        assert args.command == "demo" and path.name == "demo.yaml"
        overrides = []
    cfg = load_config(path, overrides=overrides)
    assert cfg.source == str(path)
    if cfg.scaling.use_gpu:
        assert cfg.model.quantization == "none" or cfg.model.compute_dtype == "bfloat16"
    assert not cfg.train.kernels, f"{path.name}: train.kernels stays off until a recorded GPU run verifies them"
    if cfg.train.deepspeed.stage == 3 and cfg.model.quantization == "nf4":
        assert cfg.model.quant_storage != "uint8", "ZeRO-3 shards 4-bit weights only with a float quant_storage"


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_compiles_imports_and_documents_its_command(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only: main() runs under __main__
    assert callable(getattr(module, "main", None))
    assert f"python examples/{path.name}" in (module.__doc__ or ""), f"{path.name}: the docstring gives its command"
