"""`raysft` command line. Each subcommand parses its flags and calls the Python API.

Errors a user can cause are `RaysftError`s: printed as one sentence, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from raysft.pipeline.errors import ConfigError, RaysftError


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="YAML config file (see examples/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by dotted path, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _load(args: argparse.Namespace):
    from raysft.pipeline.config import load_config

    return load_config(args.config, overrides=args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
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
    from raysft.pipeline.data.plan import prepare

    stats = prepare(_load(args), output=args.output)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raysft.pipeline.trainer import train

    result = train(_load(args))
    print(json.dumps(result.summary(), indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raysft.pipeline.sweep.run import tune

    sweep = tune(_load(args), resume=args.resume)
    print(sweep.summary_line())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raysft.pipeline.models.export import export_run

    path = export_run(args.run_dir, merge=args.merge, output=args.output)
    print(f"Exported to {path}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from raysft.pipeline.models.fetch import fetch_model

    path = fetch_model(args.name, directory=args.dir)
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raysft.pipeline.demo.run import run_demo

    return run_demo(output=args.output, overrides=args.overrides)


def cmd_submit(args: argparse.Namespace) -> int:
    from raysft.pipeline.jobs.submit import submit

    return submit(args)


def cmd_status(args: argparse.Namespace) -> int:
    from raysft.pipeline.jobs.submit import status

    return status(args)


def cmd_logs(args: argparse.Namespace) -> int:
    from raysft.pipeline.jobs.submit import logs

    return logs(args)


def cmd_stop(args: argparse.Namespace) -> int:
    from raysft.pipeline.jobs.submit import stop

    return stop(args)


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
    _add_config_args(p, optional=True)
    p.add_argument("--explain", action="store_true",
                   help="print every key (dotted path) with its type, default and description; with CONFIG, "
                        "also the values it sets")
    p.add_argument("--markdown", action="store_true",
                   help="with --explain: the reference as the README's markdown tables")

    p = add("prepare", cmd_prepare, "run only the data plan and write the processed dataset and stats.json")
    _add_config_args(p)
    p.add_argument("--output", default=None, help="output folder (default: the prepared-data cache)")

    p = add("train", cmd_train, "prepare (or reuse the cache) and run QLoRA SFT with Ray Train")
    _add_config_args(p)

    p = add("tune", cmd_tune, "run a Ray Tune sweep over the config's tune.search_space")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same run.name")

    p = add("export", cmd_export, "export a finished run's adapter, optionally merged into the base model")
    p.add_argument("run_dir", help="the run directory written by `raysft train`")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base and save a bf16 model")
    p.add_argument("--output", default=None, help="output folder (default: RUN_DIR/merged or RUN_DIR/adapter)")

    models = sub.add_parser("models", help="manage base models", description="manage base models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser("fetch", help="make a model available locally in Hugging Face format")
    p.set_defaults(func=cmd_models_fetch)
    p.add_argument("name", help="smollm2-135m-instruct, or a hub id when online")
    p.add_argument("--dir", default=None, help="target folder (default: ~/.cache/raysft/models/NAME)")

    p = add("demo", cmd_demo, "the main job: QLoRA SFT of a real small instruct model on a local Ray cluster")
    p.add_argument("--output", default="runs/demo", help="where the run, report and plot go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo config")

    p = add("submit", cmd_submit, "submit `raysft train` (or `tune`) as a Ray Job to a running cluster")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--command", dest="job_command", choices=["train", "tune"], default=None,
                   help="what the job runs (default: tune when the config has a search space, else train)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable from here to the job (repeatable; for secrets)")
    p.add_argument("--working-dir", default=None,
                   help="folder shipped as the job's working directory, minus secrets, caches and outputs (default: .)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out files matching this gitignore-style pattern (repeatable)")

    for name, fn, help in [
        ("status", cmd_status, "show a Ray Job's status"),
        ("logs", cmd_logs, "print a Ray Job's logs"),
        ("stop", cmd_stop, "stop a Ray Job"),
    ]:
        p = add(name, fn, help)
        p.add_argument("job", help="the job id printed by `raysft submit`")
        p.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)")
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
        print("raysft: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
