"""The ``svdquant`` command, kept out of ``diffusers_svdquant`` so that ``svdquant --help`` answers at once.

``import diffusers_svdquant`` loads torch and diffusers and registers the backend with diffusers (seconds), and
Python runs a package's ``__init__`` before any of its modules: a parser inside that package could not start
faster. This package imports only the standard library; it holds every subcommand's arguments
(:mod:`svdquant_cli.arguments`) and imports the module that runs a subcommand (``diffusers_svdquant.apps.*``)
once the arguments are parsed and checked.

    svdquant COMMAND ...                         (the console script)
    python -m svdquant_cli COMMAND ...           (the same)
    python -m diffusers_svdquant.apps.cli ...    (the same, e.g. under ``accelerate launch`` / ``torchrun``)
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import NamedTuple

from . import arguments


class Command(NamedTuple):
    """One ``svdquant`` subcommand: its options, and the function that runs it, by name."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function", imported only when the command runs; function(args) returns the exit code


COMMANDS = (
    Command("demo", "quantize a FLUX.1-shaped (or given) model and compare it with 16-bit",
            arguments.add_demo_arguments, "diffusers_svdquant.apps.demo:run"),
    Command("push", "quantize a model (on load), save it with a model card, push it",
            arguments.add_push_arguments, "diffusers_svdquant.apps.hub_commands:run_push"),
    Command("pull", "download a quantized repo into the Hub cache",
            arguments.add_pull_arguments, "diffusers_svdquant.apps.hub_commands:run_pull"),
    Command("generate", "pull a quantized repo and generate an image",
            arguments.add_generate_arguments, "diffusers_svdquant.apps.hub_commands:run_generate"),
    Command("inspect", "what a quantized repo holds: layers, rank, sizes, format version",
            arguments.add_inspect_arguments, "diffusers_svdquant.apps.hub_commands:run_inspect"),
    Command("calibrate", "activation statistics + per-layer smoothing search",
            arguments.add_calibrate_arguments, "diffusers_svdquant.apps.calibration_commands:run_calibrate"),
    Command("quantize", "(calibrate +) quantize + save_pretrained, one shot",
            arguments.add_quantize_arguments, "diffusers_svdquant.apps.calibration_commands:run_quantize"),
    Command("eval", "quality report: 16-bit vs naive W4A4 / SmoothQuant / SVDQuant",
            arguments.add_eval_arguments, "diffusers_svdquant.apps.calibration_commands:run_eval"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``svdquant`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="svdquant", description="SVDQuant W4A4 for diffusers models", formatter_class=arguments.HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.help, formatter_class=arguments.HelpFormatter
        )
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``svdquant`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    ``--help`` and argument errors (a missing local path included) exit here, before torch is imported.
    """
    args = arguments.parse_args(build_parser(), argv)
    module, _, function = args._run.partition(":")
    return int(getattr(importlib.import_module(module), function)(args) or 0)
