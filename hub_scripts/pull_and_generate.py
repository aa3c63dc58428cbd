"""Pull an SVDQuant repo from the Hub, build its pipeline and generate an image to a file.

    python hub_scripts/pull_and_generate.py me/flux-schnell-svdq-pipeline --prompt "a cat" --out cat.png
    python hub_scripts/pull_and_generate.py me/flux-schnell-svdq --subfolder transformer \
        --base black-forest-labs/FLUX.1-schnell --prompt "a cat" --out cat.png

Same as ``svdquant generate``; see ``diffusers_svdquant.hub.generate``.
"""

from __future__ import annotations

import argparse

from svdquant_cli import arguments


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    arguments.add_generate_arguments(p)
    args = arguments.parse_args(p, argv)
    # Imported once the arguments are good: it loads torch and diffusers (seconds), which --help needs not wait for.
    from diffusers_svdquant.apps import hub_commands

    return hub_commands.run_generate(args)


if __name__ == "__main__":
    raise SystemExit(main())
