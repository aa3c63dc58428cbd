"""Quantize a diffusers model with SVDQuant W4A4 on load, save it with a generated model card, push it.

    python hub_scripts/quantize_and_push.py black-forest-labs/FLUX.1-schnell me/flux-schnell-svdq \
        --subfolder transformer --rank 32 --calibration stats.safetensors

Same as ``svdquant push``; see ``diffusers_svdquant.hub.quantize_and_push``.
"""

from __future__ import annotations

import argparse

from svdquant_cli import arguments


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    arguments.add_push_arguments(p)
    args = arguments.parse_args(p, argv)
    # Imported once the arguments are good: it loads torch and diffusers (seconds), which --help needs not wait for.
    from diffusers_svdquant.apps import hub_commands

    return hub_commands.run_push(args)


if __name__ == "__main__":
    raise SystemExit(main())
