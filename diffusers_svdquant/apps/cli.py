"""``python -m diffusers_svdquant.apps.cli``: the ``svdquant`` command, e.g. under ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes N -m diffusers_svdquant.apps.cli calibrate PIPELINE --out ...
    torchrun --nproc_per_node N -m diffusers_svdquant.apps.cli calibrate PIPELINE --out ...

The parsers and the dispatch live in the light top-level package :mod:`svdquant_cli` (what the ``svdquant``
console script runs): ``--help`` there answers without importing this package, whose ``__init__`` loads torch
and diffusers. This module is the same command under the package's name.
"""

from __future__ import annotations

from svdquant_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
