"""Write requirements.lock: the exact version of every package `make` installs, resolved by pip itself.

    python .ci/lock.py requirements.lock     (what `make lock` runs)

pip resolves `torch==2.13.0` (the CPU build this machine serves from its local wheel folder, through pip's own
configuration) and `.[test]` into an empty environment without installing anything (`--dry-run --ignore-installed
--report`), newest versions that pyproject.toml allows; every package of that resolution, direct and transitive,
is written as `name==version`, sorted, so the same inputs give the same file. raysft itself is left out.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

TORCH = "torch==2.13.0"  # the Makefile installs it first: a plain `torch` would pull a multi-GB CUDA build


def resolve(root: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
        subprocess.run([*cmd, "--report", str(report), TORCH, f"{root}[test]"], check=True)
        items = json.loads(report.read_text())["install"]
    pins = {}
    for item in items:
        meta = item["metadata"]
        name = meta["name"].lower().replace("_", "-")
        if name != "raysft":
            pins[name] = meta["version"].split("+")[0]  # torch 2.13.0+cpu: the Makefile picks the build
    return pins


def main() -> None:
    out = Path(sys.argv[1])
    root = Path(__file__).resolve().parents[1]
    pins = resolve(root)
    py = ".".join(platform.python_version_tuple()[:2])
    header = [
        "# The exact versions `make demo`, `make test` and CI install (pip -c requirements.lock).",
        f"# Written by `make lock` (.ci/lock.py) from pyproject.toml for Python {py} on {platform.machine()} Linux;",
        "# `make test-latest` tries the newest versions pyproject.toml allows in a separate venv.",
    ]
    out.write_text("\n".join(header + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n")
    print(f"{out}: {len(pins)} packages")


if __name__ == "__main__":
    main()
