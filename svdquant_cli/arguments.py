"""Every ``svdquant`` subcommand's arguments, and the check that refuses a missing local path before any work.

Standard library only: ``svdquant --help`` and argument errors must answer without loading torch, so the few
library constants the options need are written here once and ``tests/test_cli.py`` checks they equal the
library's. The functions that run the commands live in ``diffusers_svdquant.apps``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

# == sorted(diffusers_svdquant.dtypes.DTYPES): importing that module imports torch.
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# == diffusers_svdquant.config.DEFAULT_RANK
DEFAULT_RANK = 32
# == diffusers_svdquant.calibration.stats.DEFAULT_MAX_SAMPLES
DEFAULT_MAX_SAMPLES = 128

# The Namespace attribute listing the arguments parse_args checks (set with set_defaults, so that a subcommand's
# own list reaches the Namespace only when that subcommand is chosen).
_PATH_CHECKS = "_path_checks"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's line breaks and shows every option's default.

    The default is appended as ``ArgumentDefaultsHelpFormatter`` does, except where the help already says in words
    what the default is (``(default: HF_TOKEN or the saved login)`` reads better than ``(default: None)``), for
    flags (always off unless given) and for required arguments (they have none).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.nargs == 0 or action.required or "(default" in help_text:
            return help_text
        return super()._get_help_string(action)


class _PathCheck(NamedTuple):
    prog: str
    label: str
    dest: str
    hub_ok: bool  # a Hub repo id is accepted too: only a value that looks like a local path must exist


def _path_argument(p: argparse.ArgumentParser, *names: str, hub_ok: bool, group: Any = None, **kwargs: Any) -> None:
    """Add an argument naming a local path (or, with ``hub_ok``, a Hub repo id) that :func:`parse_args` refuses
    when the path does not exist. ``group``: a mutually exclusive group of ``p`` to add it to."""
    action = (group or p).add_argument(*names, **kwargs)
    label = action.option_strings[-1] if action.option_strings else action.dest.upper()
    checks = p.get_default(_PATH_CHECKS) or ()
    p.set_defaults(**{_PATH_CHECKS: (*checks, _PathCheck(p.prog, label, action.dest, hub_ok))})


def looks_local(value: str) -> bool:
    """Whether ``value`` names a local path rather than a Hub repo id (``owner/name`` has one separator).

    True for a value starting with ``.``, ``~`` or a separator (or absolute on Windows), one with more than one
    separator, and an existing folder (so a folder named like ``owner/name`` is still found).
    """
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return (
        value.startswith((".", "~", *seps))
        or os.path.isabs(value)
        or sum(value.count(s) for s in seps) > 1
        or os.path.isdir(value)
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then refuse a local path that does not exist.

    A refused path ends the program as argparse's own errors do (exit status 2), with one line on stderr naming
    it: the command would otherwise load torch and ask the Hub for a repo of that name (seconds, then a traceback).
    A path starting with ``~`` is checked, and passed on, expanded.
    """
    args = parser.parse_args(argv)
    for check in getattr(args, _PATH_CHECKS, ()):
        value = getattr(args, check.dest)
        if value is None or (check.hub_ok and not looks_local(str(value))):
            continue
        path = os.path.expanduser(str(value))
        if not os.path.exists(path):
            hint = " (and is not a Hub repo id: those look like owner/name)" if check.hub_ok else ""
            parser.exit(2, f"{check.prog}: {check.label} {str(value)!r} does not exist{hint}\n")
        if path != str(value):
            setattr(args, check.dest, type(value)(path))
    return args


# --- svdquant demo ---------------------------------------------------------------------------------------------


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant demo`` and ``python -m diffusers_svdquant.apps.demo``."""
    _path_argument(
        p,
        "--model",
        hub_ok=True,
        help="a diffusers model folder or Hub repo (default: a FLUX.1-shaped model built here)",
    )
    p.add_argument("--subfolder", default=None, help="subfolder of --model holding the denoiser (default: its root)")
    p.add_argument("--blocks", default="1,1", help="double,single blocks of the built-in FLUX.1-shaped model")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="rank of the 16-bit low-rank branch")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="16-bit dtype of the model")
    p.add_argument("--steps", type=int, default=2, help="denoising steps")
    p.add_argument("--image-tokens", type=int, default=256, help="latent tokens (256 = a 256x256 FLUX image)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt tokens")


# --- svdquant push | pull | generate | inspect -----------------------------------------------------------------


def _token_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")


def _hub_options(p: argparse.ArgumentParser) -> None:
    _token_option(p)
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant push`` and ``hub_scripts/quantize_and_push.py``."""
    _path_argument(
        p, "source", hub_ok=True, help="a diffusers model folder or Hub repo (16-bit: quantized on load; or SVDQuant)"
    )
    p.add_argument(
        "repo_id",
        nargs="?",
        default=None,
        help="namespace/name to push to (default: none, only with --save-dir: save without pushing)",
    )
    p.add_argument(
        "--subfolder",
        default=None,
        help="the model's folder in SOURCE, kept in the pushed repo (default: SOURCE's root)",
    )
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="rank of the 16-bit low-rank branch")
    _path_argument(
        p, "--calibration", hub_ok=False, help="activation statistics (.safetensors) for smoothing (default: none)"
    )
    p.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES, help="dtype to quantize in")
    p.add_argument("--base-model", default=None, help="card metadata base_model (default: SOURCE if a repo id)")
    p.add_argument("--max-shard-size", default=None, help='shard the weights, e.g. "5GB" (default: diffusers\' 10GB)')
    p.add_argument("--measure-quality", action="store_true", help="compare with the 16-bit model, put it on the card")
    p.add_argument("--save-dir", default=None, help="keep the saved folder here (default: a temporary folder)")
    p.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--overwrite", action="store_true", help="replace a repo that holds a different model")
    p.add_argument("--no-create", action="store_true", help="fail if the repo does not exist")
    _hub_options(p)


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant pull``."""
    p.add_argument("repo_id", help="the Hub repo (owner/name)")
    p.add_argument("--revision", default=None, help="branch or commit id (default: the repo's default branch)")
    p.add_argument(
        "--subfolder",
        default=None,
        help="download only this folder (+ card, model_index.json) (default: the whole repo)",
    )
    p.add_argument("--cache-dir", default=None, help="download folder (default: the Hub cache, HF_HUB_CACHE)")
    _hub_options(p)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant generate`` and ``hub_scripts/pull_and_generate.py``."""
    p.add_argument("repo_id", help="a quantized pipeline repo, or a quantized model repo with --base")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg)")
    _path_argument(p, "--base", hub_ok=True, help="16-bit pipeline to plug a quantized model repo into (default: none)")
    p.add_argument(
        "--component",
        default=None,
        help="pipeline component the model replaces (default: transformer; unet for a UNet)",
    )
    p.add_argument("--revision", default=None, help="branch or commit id (default: the repo's default branch)")
    p.add_argument("--subfolder", default=None, help="the model's folder in REPO_ID, with --base (default: its root)")
    p.add_argument("--cache-dir", default=None, help="download folder (default: the Hub cache, HF_HUB_CACHE)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra pipeline call argument, VALUE parsed as JSON when it can be; repeatable (default: none)",
    )
    _token_option(p)


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant inspect`` and ``hub_scripts/inspect_repo.py``."""
    _path_argument(p, "repo", hub_ok=True, help="a Hub repo id or a saved folder")
    p.add_argument("--revision", default=None, help="branch or commit id (default: the repo's default branch)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also compare every tensor with the checksums written at save time (downloads a remote repo's weights)",
    )
    _hub_options(p)


# --- svdquant calibrate | quantize | eval ----------------------------------------------------------------------


def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    _path_argument(p, "model", hub_ok=True, help="a diffusers pipeline: a local folder or a Hub repo id")
    p.add_argument("--component", default=None, help="the module to quantize (default: transformer or unet)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="load dtype (default: as saved)")
    p.add_argument("--revision", default=None, help="Hub branch or commit id (default: the repo's default branch)")
    p.add_argument(
        "--pipeline-kwargs",
        type=json.loads,
        default={},
        metavar="JSON",
        help='extra arguments for every pipeline call, e.g. {"height": 512}',
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the pipeline calls")


def _rows_per_column(value: str) -> int | str | None:
    """``--hessian-rows-per-column``: an integer >= 1, ``all`` (None: every call) or ``auto`` (the default)."""
    if value in ("all", "auto"):
        return None if value == "all" else value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'all', got {value!r}")
    return n


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="a text file, one prompt per line (default: the shipped calibration prompts)",
    )
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per calibration prompt")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="rank of the 16-bit low-rank branch")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES, help="input rows kept per layer")
    p.add_argument("--no-search", action="store_true", help="statistics only, no (alpha, beta) search")
    p.add_argument(
        "--gptq",
        action="store_true",
        help="also gather each layer's XᵀX, so quantization rounds the residual with GPTQ (its upper triangle: "
        "about 2·K² bytes per float32 sum while recording)",
    )
    xtx = p.add_mutually_exclusive_group()
    xtx.add_argument(
        "--hessian-passes",
        type=int,
        default=None,
        help="with --gptq: gather XᵀX in N passes over the prompts, one group of layers each, written to disk "
        "between passes (default: 1)",
    )
    xtx.add_argument(
        "--hessian-budget-gib",
        type=float,
        default=None,
        help="with --gptq: as few passes as keep the XᵀX sums held while recording within this many GiB "
        "(default: none, one pass)",
    )
    p.add_argument(
        "--hessian-dir",
        type=Path,
        default=None,
        help="with --gptq: keep the passes' XᵀX shards in this folder (default: a temporary one)",
    )
    p.add_argument(
        "--hessian-prompts",
        type=int,
        default=None,
        help="with --gptq: gather XᵀX over this many of the prompts, spread evenly (default: all); the passes "
        "after the first run those alone",
    )
    p.add_argument(
        "--hessian-rows-per-column",
        type=_rows_per_column,
        default="auto",
        metavar="N|all|auto",
        help="with --gptq: each layer's XᵀX sums a random share of its calls, about N rows per input column; 'all': "
        "every call (default: auto, 64 with fixed-point sums, where the W4A4 output error measured 1.0005x every "
        "call's)",
    )
    p.add_argument(
        "--hessian-sum",
        choices=("auto", "tree", "fixed"),
        default=None,
        help="with --gptq: how the prompts' XᵀX are added, the same bits on any number of processes: 'tree' "
        "(up to log2(prompts per process) + 1 float32 sums per layer while recording), 'fixed' (int64 fixed point "
        "in units sized from the first forward: ~6·K² bytes per layer however many prompts; a layer that outgrows "
        "them is recorded again after the other passes), or 'auto' (default: 'fixed' from 8 prompts, where it "
        "holds less)",
    )


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant calibrate``."""
    _pipeline_arguments(p)
    _calibration_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="the statistics file to write (.safetensors)")
    p.add_argument("--include-samples", action="store_true", help="also store the sampled input rows")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant quantize``."""
    _pipeline_arguments(p)
    _calibration_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="folder to write the quantized pipeline (or model) to")
    source = p.add_mutually_exclusive_group()
    _path_argument(
        p,
        "--calibration",
        hub_ok=False,
        group=source,
        type=Path,
        default=None,
        help="a statistics file from `svdquant calibrate` (default: none, no smoothing)",
    )
    source.add_argument("--calibrate", action="store_true", help="calibrate first (a pipeline only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant eval``."""
    _pipeline_arguments(p)
    _calibration_arguments(p)
    _path_argument(
        p,
        "--calibration",
        hub_ok=False,
        type=Path,
        default=None,
        help="a statistics file from `svdquant calibrate` (default: calibrate here)",
    )
    p.add_argument(
        "--eval-prompts",
        type=Path,
        default=None,
        help="prompts to compare on, one per line (default: the shipped evaluation prompts)",
    )
    p.add_argument("--num-eval-prompts", type=int, default=4, help="use the first N evaluation prompts")
    p.add_argument("--eval-steps", type=int, default=None, help="denoising steps when comparing (default: --steps)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file (default: none)")
