"""The ``svdquant`` command: one entry point, subcommands contributed by feature modules.

Each feature module exposes ``add_commands(subparsers)``, adding its subcommands with
``set_defaults(func=...)``; ``func(args)`` returns the exit code. Keeping the subcommands beside
the code they drive keeps this file a dispatcher.

    svdquant demo ...                            (diffusers_svdquant.apps.demo)
    python -m diffusers_svdquant.apps.cli ...    (same, e.g. under ``accelerate launch``)
"""

from __future__ import annotations

import argparse
import importlib

# Feature modules that contribute subcommands; a module missing here (a partial install) is skipped.
COMMAND_MODULES = (
    "diffusers_svdquant.apps.demo",
    "diffusers_svdquant.apps.hub_commands",
    "diffusers_svdquant.apps.calibration_commands",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``svdquant`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="svdquant", description="SVDQuant W4A4 for diffusers models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``svdquant`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
