"""pipeline/ARCHITECTURE.md is the map of the code: its tree lists exactly the modules on disk, and code cites it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "pipeline" / "ARCHITECTURE.md"
ROOTS = ("pipeline", "kernels")
TREE_HEADING = "## Where each concept lives"


def doc_tree() -> dict[str, str]:
    """The tree under TREE_HEADING as {path relative to the repository: its one-line description}."""
    text = DOC.read_text()
    assert TREE_HEADING in text, f"{DOC.relative_to(REPO)} lacks the section '{TREE_HEADING}'"
    block = re.search(r"```[a-z]*\n(.*?)```", text.split(TREE_HEADING, 1)[1], re.S)
    assert block, f"the section '{TREE_HEADING}' holds no fenced tree"
    entries: dict[str, str] = {}
    stack: list[str] = []
    for number, line in enumerate(block.group(1).splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"tree line {number} is not indented by a multiple of 2 spaces: {line!r}"
        name, _, description = line.strip().partition(" ")
        depth = indent // 2
        assert depth <= len(stack), f"tree line {number} is indented deeper than its folder: {line!r}"
        del stack[depth:]
        path = "/".join([*stack, name.rstrip("/")])
        assert path not in entries, f"the tree lists {path} twice"
        entries[path] = description.strip()
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return entries


def test_tree_lists_every_module_on_disk_and_nothing_else():
    tree = doc_tree()
    on_disk = sorted(
        p.relative_to(REPO).as_posix()
        for root in ROOTS
        for p in (REPO / root).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    missing = [
        f"{m} is not in the tree of pipeline/ARCHITECTURE.md: add a line for it under {m.rsplit('/', 1)[0]}/"
        for m in on_disk
        if m not in tree
    ]
    assert not missing, "\n".join(missing)
    gone = [f"pipeline/ARCHITECTURE.md lists {p}, which does not exist" for p in tree if not (REPO / p).exists()]
    assert not gone, "\n".join(gone)
    folders = {m.rsplit("/", 1)[0] for m in on_disk}
    for path, description in tree.items():
        if path not in folders and path not in ROOTS:
            assert description, f"pipeline/ARCHITECTURE.md lists {path} without a description"


def test_no_code_cites_a_design_file_the_repository_does_not_have():
    cited = []
    for root in (*ROOTS, "tests", "examples", "cluster"):
        for p in (REPO / root).rglob("*"):
            if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".txt"} and p != Path(__file__).resolve():
                if "DESIGN.md" in p.read_text(errors="replace"):
                    cited.append(p.relative_to(REPO).as_posix())
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if "DESIGN.md" in page.read_text():
            cited.append(page.relative_to(REPO).as_posix())
    assert not cited, f"{cited} cite DESIGN.md, which is not in the repository; cite pipeline/ARCHITECTURE.md"
