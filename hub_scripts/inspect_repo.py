"""What an SVDQuant repo (on the Hub, or a saved folder) holds: models, rank, format version, layers, sizes.

    python hub_scripts/inspect_repo.py me/flux-schnell-svdq [--revision REV] [--json]

Reads the configs, the card and the safetensors headers only. Same as ``svdquant inspect``.
"""

from __future__ import annotations

import argparse

from svdquant_cli import arguments


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    arguments.add_inspect_arguments(p)
    args = arguments.parse_args(p, argv)
    # Imported once the arguments are good: it loads torch and diffusers (seconds), which --help needs not wait for.
    from diffusers_svdquant.apps import hub_commands

    return hub_commands.run_inspect(args)


if __name__ == "__main__":
    raise SystemExit(main())
