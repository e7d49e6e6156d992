"""`raysft` command line. Each subcommand parses its flags and calls the Python API.

Errors a user can cause are `RaysftError`s: printed as one sentence, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from raysft.pipeline import storage
from raysft.pipeline.data.preview import HTML_NAME, preview
from raysft.pipeline.errors import ConfigError, RaysftError
from raysft.pipeline.jobs.submit import logs, status, stop, submit
from raysft.pipeline.run_folder import LOG_FILE, local_dir_of
from raysft.pipeline.runs import format_table, list_runs, rows_json, write_report


def add_verbose_arg(p: argparse.ArgumentParser, log: str = "the run folder's raysft.log") -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help=f"also show Ray, Ray Train, Ray Data and DeepSpeed logs (always in {log})",
    )


def add_overrides_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="YAML config file (see examples/)")
    add_overrides_arg(p, "override a config key by dotted path, e.g. --set train.lr=1e-4 (repeatable)")


def _load(args: argparse.Namespace):
    # pydantic loads when a config is read, so `raysft --help` stays quick
    from raysft.pipeline.config import load_config

    return load_config(args.config, overrides=args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    # pydantic, as in _load
    from raysft.pipeline.config import explain_markdown, explain_text, load_config

    if args.markdown and (not args.explain or args.config or args.overrides):
        raise ConfigError("raysft config --markdown goes with --explain alone (it renders the schema, not a config).")
    if args.explain:
        given = args.config is not None or bool(args.overrides)
        print(explain_markdown() if args.markdown else explain_text(_load(args) if given else None), end="")
        return 0
    if args.config is None:
        raise ConfigError("raysft config needs a CONFIG file to resolve (or --explain for the reference of every key).")
    print(load_config(args.config, overrides=args.overrides).dump_yaml(), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """The same console as `train`, on stderr: stage lines, a progress bar on a terminal, the per-source summary;
    Ray's and the plan's own output go to the log. stdout gets stats.json as one line when it is not a terminal."""
    # pyarrow (and Ray, when the plan runs) load with the command that needs them
    from raysft.pipeline.console import PrepareConsole, console_session
    from raysft.pipeline.data.plan import ensure_prepared, prepare, prepare_log_path, reporting, resolve_inputs, summary

    cfg = _load(args)
    log_file = prepare_log_path(cfg)
    with console_session(log_file, verbose=args.verbose, on_stderr=True) as console:
        where = args.output if args.output is not None else "the prepared-data cache"
        tokenizer = cfg.model.tokenizer or cfg.model.name_or_path
        shown = PrepareConsole(console, f"data {cfg.data.train}, tokenizer {tokenizer} -> {where}")
        with reporting(shown):
            if args.output is not None:
                stats = prepare(cfg, output=args.output)
                directory = args.output if storage.is_remote(args.output) else Path(args.output).expanduser()
            else:
                prepared = ensure_prepared(cfg)
                stats, directory = prepared.stats, prepared.train_dir.parent
        done = "written" if shown.ran else "reused (already prepared)"
        shown.stage(3, f"{done}: {directory} ({stats['rows_used']} rows kept of {stats['rows_read']})")
        for line in summary(stats).splitlines()[1:]:
            console.line(line)
        if stats.get("tool_call_ids_rewritten"):
            console.line(f"  {stats['tool_call_ids_rewritten']} tool-call id(s) mapped to the chat template's form")
        console.line(f"  stats    {storage.join(directory, 'stats.json')}")
        console.line(f"  log      {log_file}")
    if not sys.stdout.isatty():
        print(json.dumps(stats), flush=True)
    if args.preview:
        # pyarrow

        print(preview(directory, resolve_inputs(cfg).tokenizer, args.preview, sys.stdout.isatty()))
        print(f"raysft prepare: mask preview written to {directory / HTML_NAME}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # Ray, torch and pyarrow load with the command that needs them
    from raysft.pipeline.console import console_session, log_plan, run_with_console
    from raysft.pipeline.trainer import train

    cfg = _load(args)
    log_file = local_dir_of(cfg) / LOG_FILE
    with console_session(log_file, verbose=args.verbose) as console:
        log_plan(console, cfg)
        result = run_with_console(cfg, lambda: train(cfg), console=console, log_file=log_file)
    print(json.dumps(result.summary(), indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    # Ray Tune, torch
    from raysft.pipeline.sweep.run import tune

    sweep = tune(_load(args), resume=args.resume)
    print(sweep.summary_line())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # pyarrow, pydantic (torch and transformers when the export runs)
    from raysft.pipeline.models.export import export_run

    fmt = args.format
    if args.merge:
        if fmt not in (None, "merged"):
            raise ConfigError(f"--merge means --format merged; it cannot go with --format {fmt}.")
        fmt = "merged"
    path = export_run(args.run_dir, output=args.output, format=fmt or "peft", dtype=args.dtype, quant=args.quant)
    print(f"Exported ({fmt or 'peft'}) to {path}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    # pyarrow

    rows = list_runs(args.storage)
    print(rows_json(rows) if args.json else format_table(rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    # pyarrow (matplotlib when the report is drawn)

    for path in write_report(args.run, output=args.output):
        print(path)
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    # pydantic
    from raysft.pipeline.models.fetch import fetch_model

    path = fetch_model(args.name, directory=args.dir)
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # pydantic, pyarrow (Ray and torch when the demo runs)
    from raysft.pipeline.demo.run import run_demo

    return run_demo(output=args.output, overrides=args.overrides, verbose=args.verbose)


def cmd_submit(args: argparse.Namespace) -> int:

    return submit(
        args.config,
        args.overrides,
        address=args.address,
        wait=args.wait,
        job_command_name=args.job_command,
        env=args.env,
        working_dir=args.working_dir,
        includes=args.include,
        excludes=args.exclude,
        dry_run=args.dry_run,
    )


def cmd_status(args: argparse.Namespace) -> int:

    return status(args.job, args.address)


def cmd_logs(args: argparse.Namespace) -> int:

    return logs(args.job, args.address, follow=args.follow)


def cmd_stop(args: argparse.Namespace) -> int:

    return stop(args.job, args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysft",
        description="Ray-native supervised fine-tuning with QLoRA (Ray Data + Ray Train + DeepSpeed + Ray Tune).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add("config", cmd_config, "print the resolved config (defaults + file + overrides), or explain every key")
    add_config_args(p, optional=True)
    p.add_argument(
        "--explain",
        action="store_true",
        help="print every key (dotted path) with its type, default and description; with CONFIG, "
        "also the values it sets",
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="with --explain: the reference as docs/configuration.md's markdown tables",
    )

    p = add("prepare", cmd_prepare, "run only the data plan and write the processed dataset and stats.json")
    add_config_args(p)
    p.add_argument(
        "--output",
        default=None,
        help="output folder (default: the prepared-data cache); new, empty or an "
        "earlier raysft output, replaced only when the run succeeds",
    )
    p.add_argument(
        "--preview",
        type=int,
        default=0,
        metavar="N",
        help="print N prepared samples with trained tokens marked (colour on a terminal, [[brackets]] "
        "otherwise) and write preview.html next to stats.json",
    )

    add_verbose_arg(p, log="DATA.CACHE_DIR/logs/prepare-TIME-PID.log")

    p = add("train", cmd_train, "prepare (or reuse the cache) and run QLoRA SFT with Ray Train")
    add_config_args(p)
    add_verbose_arg(p)

    p = add("tune", cmd_tune, "run a Ray Tune sweep over the config's tune.search_space")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same run.name")

    p = add("export", cmd_export, "export a finished run: its adapter, a merged model, or a GGUF file")
    p.add_argument("run_dir", help="the run directory written by `raysft train`")
    p.add_argument(
        "--format",
        default=None,
        help="peft (the adapter, default), merged (safetensors + tokenizer for vLLM / TGI) "
        "or gguf (llama.cpp / Ollama)",
    )
    p.add_argument("--merge", action="store_true", help="the same as --format merged")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "f16", "f32"],
        help="weights of merged (default bf16) or gguf (default f16)",
    )
    p.add_argument("--quant", default=None, choices=["q8_0"], help="gguf only: quantize the weights (Q8_0)")
    p.add_argument(
        "--output",
        default=None,
        help="output folder (default: RUN_DIR/<format>); new, "
        "empty or an earlier raysft export, replaced only when the export succeeds",
    )

    p = add("runs", cmd_runs, "list the runs in a storage path: status, steps, eval loss, tokens/s, adapter, sweep")
    p.add_argument("storage", nargs="?", default="runs", help="the run.storage_path to list (default: runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    p = add("report", cmd_report, "write PNG plots of a run's metrics.jsonl (loss, eval loss, lr, tokens/s, grad norm)")
    p.add_argument("run", help="a run folder (run.storage_path/run.name, or a sweep's trials/ID)")
    p.add_argument("--output", default=None, help="where the PNGs go (default: RUN/report)")

    models = sub.add_parser("models", help="manage base models", description="manage base models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser("fetch", help="make a model available locally in Hugging Face format")
    p.set_defaults(func=cmd_models_fetch)
    p.add_argument("name", help="smollm2-135m-instruct, or a hub id when online")
    p.add_argument("--dir", default=None, help="target folder (default: ~/.cache/raysft/models/NAME)")

    p = add("demo", cmd_demo, "the main job: QLoRA SFT of a real small instruct model on a local Ray cluster")
    p.add_argument("--output", default="runs/demo", help="where the run, report and plot go")
    add_overrides_arg(p, "override a key of the demo config (repeatable)")
    add_verbose_arg(p)

    p = add("submit", cmd_submit, "submit `raysft train` (or `tune`) as a Ray Job to a running cluster")
    add_config_args(p)
    p.add_argument(
        "--address", default=None, help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    )
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument(
        "--command",
        dest="job_command",
        choices=["train", "tune"],
        default=None,
        help="what the job runs (default: tune when the config has a search space, else train)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable from here to the job (repeatable; for secrets)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATH",
        help="also ship this file or folder (inside the job's folder; repeatable); the config, the files "
        "it references and raysft itself always ship",
    )
    p.add_argument(
        "--working-dir",
        default=None,
        help="also ship this whole folder as the job's working directory, minus .gitignore'd files, "
        "credentials, caches, outputs and links that leave it (default: ship only what the job needs)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="with --working-dir, also leave out files matching this gitignore-style pattern (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the exact files and total size that would be uploaded, and submit nothing",
    )

    for name, fn, help in [
        ("status", cmd_status, "show a Ray Job's status"),
        ("logs", cmd_logs, "print a Ray Job's logs"),
        ("stop", cmd_stop, "stop a Ray Job"),
    ]:
        p = add(name, fn, help)
        p.add_argument("job", help="the job id printed by `raysft submit`")
        p.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)")
        p.set_defaults(follow=False)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except RaysftError as exc:
        print(f"raysft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raysft: interrupted; resume with the same command.", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
