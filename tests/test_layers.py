"""The layers of pipeline/ARCHITECTURE.md hold: the import-linter contract in pyproject.toml ([tool.importlinter],
run by `make lint`) passes and fails on a planted upward import; no import cycles (module-level and function-level
imports alike); an import inside a function only where it defers a heavy package and says so in a comment."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"raysft.pipeline": REPO / "pipeline", "raysft.kernels": REPO / "kernels"}
# What a function-level import may defer: packages whose import costs a noticeable share of a second or more.
HEAVY = {
    "torch",
    "transformers",
    "ray",
    "deepspeed",
    "peft",
    "bitsandbytes",
    "triton",
    "matplotlib",
    "mlflow",
    "wandb",
    "datasets",
    "tensorboard",
    "pyarrow",
    "pydantic",
    "jinja2",
    "requests",
    "aiohttp",
    "fsspec",
    "huggingface_hub",
}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def modules() -> dict[str, Path]:
    out = {}
    for prefix, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            out[prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported name, line, inside a function)], relative imports resolved; a name that is a module of
    ours is kept as that module, any other as its dotted text."""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        inner = {
            id(n)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(fn)
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            found += [(t, node.lineno, id(node) in inner) for t in targets]
        out[name] = found
    return out


def ours(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def test_no_import_cycles():
    """Tarjan over every import of pipeline/ and kernels/ (as /work/shared/tools/import_cycles.py counts them)."""
    mods = modules()
    graph = {m: set() for m in mods}
    for m, found in imports(mods).items():
        for target, _, _ in found:
            t = ours(target, mods)
            if t and t != m and not m.startswith(t + "."):
                graph[m].add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in mods:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_an_import_inside_a_function_defers_a_heavy_package_and_says_so():
    """A function-level import of one of our modules must bring a HEAVY package the importing module does not
    already load (else it belongs at the top, where the layer contract sees it), with a comment on the import or
    the line above it. A function-level import of the standard library belongs at the top unless a comment says
    why not (e.g. a module newer than the oldest Python supported); other packages are deferred as each module
    sees fit."""
    mods = modules()
    found = imports(mods)

    def heavy(module: str, seen: set[str]) -> set[str]:
        out: set[str] = set()
        for target, _, lazy in found[module]:
            if lazy:
                continue
            t = ours(target, mods)
            if t is None:
                out |= {target.split(".")[0]} & HEAVY
            elif t not in seen:
                seen.add(t)
                out |= heavy(t, seen)
        return out

    problems = []
    for module, entries in found.items():
        lines = mods[module].read_text().splitlines()
        own = heavy(module, {module})
        for target, line, lazy in entries:
            if not lazy:
                continue
            where = f"{mods[module].relative_to(REPO)}:{line}"
            t = ours(target, mods)
            commented = "#" in lines[line - 1] or comment_above(lines, line)
            if t is None:
                if target.split(".")[0] in sys.stdlib_module_names and not commented:
                    problems.append(f"{where} imports {target} inside a function; import it at the top")
                continue
            if not heavy(t, {t}) - own:
                problems.append(f"{where} imports {t} inside a function but defers nothing heavy; import it at the top")
            elif not commented:
                problems.append(f"{where} imports {t} inside a function without a comment saying what it defers")
    assert not problems, "\n".join(problems)


def contract_layers() -> list[list[str]]:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "layers"]
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def test_every_module_has_a_layer():
    """The contract names every module (a package only when none of its modules is named), so a new module
    cannot sit outside the layers unchecked."""
    listed = [m for layer in contract_layers() for m in layer]
    assert len(listed) == len(set(listed)), "a module is in two layers"
    mods = modules()
    covered = {m for m in mods if any(m == name or m.startswith(name + ".") for name in listed)}
    packages = {m for m in mods if mods[m].name == "__init__.py"}
    missing = sorted(set(mods) - covered - packages)
    assert not missing, f"modules in no layer of pyproject.toml's [tool.importlinter]: {missing}"


def comment_above(lines: list[str], line: int) -> bool:
    """Whether a comment line heads the block of import statements that holds line `line` (1-based)."""
    i = line - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith(("from ", "import ", ")")) or text.endswith(","):
            i -= 1
            continue
        return text.startswith("#")
    return False


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_layer_contract_holds_and_fails_on_a_planted_upward_import(tmp_path):
    ok = lint_imports(REPO)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The same contract over a copy of the package in which the foundation (errors.py) imports the trainer.
    copy = tmp_path / "raysft"
    for prefix, root in PACKAGES.items():
        shutil.copytree(root, copy / prefix.split(".")[1], ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "pipeline" / "errors.py"
    planted.write_text(planted.read_text() + "\n\nfrom raysft.pipeline import trainer  # noqa: E402, F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u, sys; sys.stdout.write(u.find_spec('raysft.pipeline').origin)",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.stdout == str(copy / "pipeline" / "__init__.py"), probe.stdout + probe.stderr  # the copy is checked
    broken = lint_imports(tmp_path, env)
    assert broken.returncode != 0, broken.stdout
    assert "BROKEN" in broken.stdout and "raysft.pipeline.errors -> raysft.pipeline.trainer" in broken.stdout, (
        broken.stdout
    )
