"""The README and docs/ stay true: the README fits on a screen, its links and the docs' links resolve
(`mkdocs build --strict` for docs/, which fails on a planted broken link), and every shell command in
their code blocks still works: cheap ones are run (`raysft --help`, `raysft config --explain`, ...), the
others parsed (the raysft subcommand and its flags by the CLI's own argparse, the files named exist,
make targets exist, modules import)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
REPO_DIRS = ("examples/", "tests/", "cluster/", "pipeline/", "kernels/", "docs/")
OPERATORS = {"&&", "||", "|", ";"}


def test_readme_fits_on_a_screen():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move reference material into a docs/ page"


# ----------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """The anchor of a heading, as MkDocs' toc extension and GitHub make it (for plain-text headings)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.+)$", text, flags=re.M)}


def test_readme_links_are_relative_and_resolve():
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links), "README.md links to no docs/ page"
    bad = []
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("/"):
            bad.append(f"{link} (not relative)")
            continue
        target, _, anchor = link.partition("#")
        path = (REPO / target) if target else README
        if not path.exists():
            bad.append(f"{link} (no such file)")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            bad.append(f"{link} (no such anchor)")
    assert not bad, f"README.md links that do not resolve: {bad}"


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docs_build_strict_and_every_page_is_in_the_nav(tmp_path):
    build = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert build.returncode == 0, build.stderr[-4000:]
    assert "WARNING" not in build.stderr, build.stderr[-4000:]
    built = {p.stem for p in (tmp_path / "site").glob("*.html")}
    assert {p.stem for p in DOCS} <= built


@pytest.mark.parametrize(
    "planted, expected",
    [
        ("[a page that is not there](missing.md)", "missing.md"),
        ("[an anchor that is not there](data.md#no-such-heading)", "no-such-heading"),
        ("[an absolute link](/docs/data.md)", "/docs/data.md"),
        (None, "orphan.md"),  # a page in docs/ that the nav does not list
    ],
    ids=["missing-page", "missing-anchor", "absolute-link", "page-not-in-nav"],
)
def test_docs_build_fails_on_a_planted_broken_link(tmp_path, planted, expected):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    if planted is None:
        (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n\nNo nav entry.\n")
    else:
        index = tmp_path / "docs" / "index.md"
        index.write_text(index.read_text() + f"\nSee {planted}.\n")
    build = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert build.returncode != 0, f"the strict build passed with {planted or 'an unlisted page'}"
    assert expected in build.stderr, build.stderr[-3000:]


# ----------------------------------------------------------------------------- shell commands


@dataclass
class Command:
    source: str  # file:line
    argv: list[str]
    strict_files: bool  # README: every config file it names must exist (docs may use placeholders like my.yaml)


def shell_commands(path: Path) -> list[Command]:
    """Every command in the file's ```bash (sh, shell, console) blocks: continuation lines joined, comments
    dropped, split at && || | ;."""
    commands, lang, pending, start = [], None, "", 0
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang not in SHELL_LANGS or not (line.strip() or pending):
            continue
        start = start or number
        pending += line.strip().removeprefix("$ ")
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv: list[str] = []
        for token in shlex.split(pending, comments=True) + [";"]:
            if token in OPERATORS:
                if argv:
                    commands.append(Command(f"{where}:{start}", argv, path == README))
                argv = []
            else:
                argv.append(token)
        pending, start = "", 0
    return commands


ALL_COMMANDS = [c for p in [README, *DOCS] for c in shell_commands(p)]


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def check_repo_paths(cmd: Command) -> None:
    missing = [t for t in cmd.argv if t.startswith(REPO_DIRS) and not (REPO / t).exists()]
    assert not missing, f"{cmd.source}: {shlex.join(cmd.argv)} names files that are not in the repository: {missing}"


def check_config_and_overrides(cmd: Command, config: str | None, overrides: list[str]) -> None:
    from raysft.pipeline.config import load_config

    path = REPO / config if config else None
    if path is not None and not path.is_file():
        assert not cmd.strict_files, f"{cmd.source}: {shlex.join(cmd.argv)}: {config} does not exist"
        path = None  # a placeholder such as my.yaml: check the overrides against the schema alone
    load_config(path, overrides=overrides)  # unknown keys or bad values raise ConfigError


def cheap(argv: list[str]) -> bool:
    """Commands the test runs: help, the config printer, and a submit dry run (it contacts no cluster)."""
    sub = argv[1:2]
    return "--help" in argv or "-h" in argv or sub == ["config"] or (sub == ["submit"] and "--dry-run" in argv)


def check_raysft(cmd: Command) -> None:
    from raysft.pipeline.cli import build_parser

    try:
        args = build_parser().parse_args(cmd.argv[1:])
    except SystemExit as exc:
        assert exc.code == 0, f"{cmd.source}: `{shlex.join(cmd.argv)}` is not a valid raysft command line"
        args = None
    if args is not None and hasattr(args, "overrides"):
        check_config_and_overrides(cmd, getattr(args, "config", None), args.overrides or [])
    if cmd.strict_files and cheap(cmd.argv):
        run = subprocess.run(
            [sys.executable, "-m", "raysft.pipeline.cli", *cmd.argv[1:]],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert run.returncode == 0, f"{cmd.source}: `{shlex.join(cmd.argv)}` failed:\n{run.stderr[-3000:]}"
        assert run.stdout.strip(), f"{cmd.source}: `{shlex.join(cmd.argv)}` printed nothing"


def check_python_module(cmd: Command, module: str, rest: list[str]) -> None:
    assert importlib.util.find_spec(module) is not None, f"{cmd.source}: no module {module}"
    if module == "raysft.pipeline.training.torchrun_entry":
        from raysft.pipeline.training.torchrun_entry import parse_args

        args = parse_args(rest)
        check_config_and_overrides(cmd, args.config, args.overrides or [])


def check_command(cmd: Command) -> None:
    check_repo_paths(cmd)
    name, rest = cmd.argv[0], cmd.argv[1:]
    if name == "raysft":
        check_raysft(cmd)
    elif name == "make":
        targets = [t for t in rest if not t.startswith("-") and "=" not in t]
        assert targets and set(targets) <= make_targets(), f"{cmd.source}: no Makefile target {targets}"
    elif name in ("python", "python3", "torchrun"):
        if "-m" in rest:
            i = rest.index("-m")
            check_python_module(cmd, rest[i + 1], rest[i + 2 :])
        else:
            script = next(t for t in rest if not t.startswith("-"))
            assert (REPO / script).is_file(), f"{cmd.source}: no script {script}"
    elif name == "bash":
        assert (REPO / rest[0]).is_file(), f"{cmd.source}: no script {rest[0]}"
    elif name == "export":
        assert all(re.match(r"[A-Z_][A-Z0-9_]*=", t) for t in rest), f"{cmd.source}: {shlex.join(cmd.argv)}"
    elif name in ("pip", "mkdocs"):
        pass  # installers and the docs tool: nothing of the repository to check
    else:
        pytest.fail(f"{cmd.source}: `{shlex.join(cmd.argv)}`: teach tests/test_docs.py how to check {name!r}")


def test_the_readme_shows_its_two_commands_and_runs_cheap_ones():
    readme = [c for c in ALL_COMMANDS if c.strict_files]
    assert ["make", "demo"] in [c.argv for c in readme] and ["make", "test"] in [c.argv for c in readme]
    assert any(c.argv[0] == "raysft" and cheap(c.argv) for c in readme), "no README command is run by this test"


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=[f"{c.source} {' '.join(c.argv[:3])}" for c in ALL_COMMANDS])
def test_every_documented_shell_command_works(cmd):
    check_command(cmd)


def test_the_command_checker_refuses_what_does_not_work(tmp_path):
    """The checks above can fail: a wrong flag, a missing config, an unknown key, target and module."""
    from raysft.pipeline.errors import RaysftError

    bad = [
        ["raysft", "train", "examples/demo.yaml", "--no-such-flag"],
        ["raysft", "train", "examples/no_such.yaml"],
        ["raysft", "train", "examples/demo.yaml", "--set", "train.no_such_key=1"],
        ["raysft", "no-such-command"],
        ["make", "no-such-target"],
        ["python", "-m", "raysft.pipeline.no_such_module"],
        ["python", "examples/no_such.py"],
        ["curl", "http://example.com"],
    ]
    for argv in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception, RaysftError)):
            check_command(Command("planted", argv, strict_files=True))
    page = tmp_path / "page.md"
    page.write_text("```bash\nraysft config \\\n  examples/demo.yaml   # a comment\nmake demo && make test\n```\n")
    assert [c.argv for c in shell_commands(page)] == [
        ["raysft", "config", "examples/demo.yaml"],
        ["make", "demo"],
        ["make", "test"],
    ]
