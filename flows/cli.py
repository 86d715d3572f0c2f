"""`lejepa-pipeline`: run the whole pipeline or one stage from the shell.

Each stage's command forwards its arguments (`--config FILE --set key=value ...`) to the stage's own
entry point in `lejepa/`, so `lejepa-pipeline shard ...` and `python -m lejepa.data.shard ...` are the same
program. Imports happen per command: Prefect and DeepSpeed are slow to import and most commands
need neither.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# command -> (module with a `cli(argv) -> int`, or "module:function", one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "demo": (
        "flows.run:demo_cli",
        "the whole pipeline on the defaults (local storage, Fashion-MNIST, the CPU, ~200 s of training)",
    ),
    "run": ("flows.run", "the whole Prefect flow on this machine: shard -> pretrain -> evaluate -> publish"),
    "deploy": ("flows.deploy", "register the deployments (manual, nightly, one per stage) on a work pool"),
    "minimal": (
        "lejepa.objective.minimal",
        "a short LeJEPA training run in one plain PyTorch loop (no set-up needed)",
    ),
    "shard": ("lejepa.data.shard", "write an image source as WebDataset shards with a manifest"),
    "pretrain": (
        "lejepa.train.pretrain",
        "train an encoder with LeJEPA and DeepSpeed, one process to many nodes",
    ),
    "evaluate": (
        "lejepa.evaluate.stage",
        "linear probe, kNN and label-free diagnostics of a run, with baselines",
    ),
    "publish": (
        "lejepa.publish.stage",
        "release a run's evaluated encoder; `latest` moves only past the gate",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="lejepa-pipeline",
        description="LeJEPA self-supervised pretraining: shard -> pretrain -> evaluate -> publish.",
        epilog="Run 'lejepa-pipeline COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("version", help="print the version")
    for name, (_, help_text) in STAGES.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "version":
        from lejepa import __version__

        print(__version__)
        return 0
    module_name, _, function = STAGES[args.command][0].partition(":")
    try:
        return getattr(importlib.import_module(module_name), function or "cli")(rest)
    except KeyboardInterrupt:  # what the command started is stopped by now (see lejepa.train.launch)
        print(f"lejepa-pipeline {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
