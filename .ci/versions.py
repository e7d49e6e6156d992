"""Say which versions this environment runs, against requirements.lock (`make test-latest` prints it twice).

python .ci/versions.py requirements.lock
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

KEY = ("torch", "ray", "transformers", "kernels", "peft", "bitsandbytes", "deepspeed", "accelerate", "pyarrow", "trl")


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def main() -> None:
    locked = {}
    for line in Path(sys.argv[1]).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[norm(name)] = version
    here = {norm(d.metadata["Name"]): d.version.split("+")[0] for d in md.distributions()}
    print("versions under test: " + ", ".join(f"{k} {here.get(k, '-')}" for k in KEY))
    moved = [f"{k} {locked[k]} -> {v}" for k, v in sorted(here.items()) if k in locked and locked[k] != v]
    new = [f"{k} {v}" for k, v in sorted(here.items()) if k not in locked and k not in ("raysft", "pip")]
    print(f"against {sys.argv[1]}: " + ("; ".join(moved) if moved else "nothing newer"))
    if new:
        print("not in the lock: " + ", ".join(new))


if __name__ == "__main__":
    main()
