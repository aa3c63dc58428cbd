"""``svdquant push | pull | generate | inspect``: the Hub workflow as subcommands (thin over :mod:`.hub`).

    svdquant push SOURCE REPO_ID [--subfolder transformer] [--rank R] [--calibration STATS.safetensors]
    svdquant pull REPO_ID [--revision REV] [--subfolder transformer] [--cache-dir DIR]
    svdquant generate REPO_ID --prompt TEXT --out image.png [--base PIPELINE_REPO]
    svdquant inspect REPO_ID_OR_FOLDER [--revision REV] [--json]

Errors from the Hub (bad token, missing repo, a repo holding another model, a dropped upload) print one message
naming the repo and its state, and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import hub
from ..config import DEFAULT_RANK


def _hub_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant push`` and ``hub_scripts/quantize_and_push.py``."""
    p.add_argument("source", help="a diffusers model folder or Hub repo (16-bit: quantized on load; or SVDQuant)")
    p.add_argument("repo_id", nargs="?", default=None, help="namespace/name to push to (omit with --save-dir only)")
    p.add_argument("--subfolder", default=None, help="the model's folder in SOURCE, kept in the pushed repo")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="rank of the 16-bit low-rank branch")
    p.add_argument("--calibration", default=None, help="activation statistics (.safetensors) for smoothing")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype to quantize in")
    p.add_argument("--base-model", default=None, help="card metadata base_model (default: SOURCE if a repo id)")
    p.add_argument("--max-shard-size", default=None, help='shard the weights, e.g. "5GB"')
    p.add_argument("--measure-quality", action="store_true", help="compare with the 16-bit model, put it on the card")
    p.add_argument("--save-dir", default=None, help="keep the saved folder here (default: a temporary folder)")
    p.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--overwrite", action="store_true", help="replace a repo that holds a different model")
    p.add_argument("--no-create", action="store_true", help="fail if the repo does not exist")
    _hub_options(p)


def run_push(args: argparse.Namespace) -> int:
    """Quantize (unless already quantized), save with a card, push; prints where it went."""
    if args.repo_id is None and args.save_dir is None:
        print("svdquant push: give REPO_ID, or --save-dir to only save", file=sys.stderr)
        return 2
    max_shard: Any = args.max_shard_size
    if max_shard is not None and max_shard.isdigit():
        max_shard = int(max_shard)
    return _guard(
        lambda: _report_push(
            *hub.quantize_and_push(
                args.source, args.repo_id, subfolder=args.subfolder, rank=args.rank, calibration=args.calibration,
                torch_dtype=args.dtype, base_model=args.base_model, max_shard_size=max_shard,
                measure=args.measure_quality, save_directory=args.save_dir, token=args.token,
                revision=args.revision, private=args.private or None, overwrite=args.overwrite,
                create=not args.no_create, endpoint=args.endpoint,
            )
        )
    )  # fmt: skip


def _report_push(folder, result: hub.PushResult | None) -> None:
    if result is None:
        print(f"saved to {folder}")
        return
    print(f"pushed {len(result.uploaded)} files to {result.repo_id}@{result.revision}: commit {result.commit_id}")
    if result.deleted:
        print(f"removed stale files: {', '.join(result.deleted)}")
    print(result.url)


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant pull``."""
    p.add_argument("repo_id")
    p.add_argument("--revision", default=None, help="branch or commit id")
    p.add_argument("--subfolder", default=None, help="download only this folder (+ card, model_index.json)")
    p.add_argument("--cache-dir", default=None)
    _hub_options(p)


def run_pull(args: argparse.Namespace) -> int:
    """Download into the cache; prints the snapshot folder and how to load it."""

    def pull() -> None:
        path = hub.pull(args.repo_id, revision=args.revision, subfolder=args.subfolder, cache_dir=args.cache_dir,
                        token=args.token, endpoint=args.endpoint)  # fmt: skip
        print(path)

    return _guard(pull)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant generate`` and ``hub_scripts/pull_and_generate.py``."""
    p.add_argument("repo_id", help="a quantized pipeline repo, or a quantized model repo with --base")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg)")
    p.add_argument("--base", default=None, help="16-bit pipeline to plug a quantized model repo into")
    p.add_argument("--component", default=None, help="pipeline component the model replaces (default: transformer)")
    p.add_argument("--revision", default=None)
    p.add_argument("--subfolder", default=None, help="the model's folder in REPO_ID (with --base)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pipeline call argument, VALUE parsed as JSON when it can be (repeatable)")  # fmt: skip
    p.add_argument("--token", default=None)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_generate(args: argparse.Namespace) -> int:
    """Pull, build the pipeline, write one image."""

    def generate() -> None:
        out = hub.generate(
            args.repo_id, args.prompt, args.out, base=args.base, component=args.component, revision=args.revision,
            subfolder=args.subfolder, cache_dir=args.cache_dir, token=args.token, steps=args.steps,
            height=args.height, width=args.width, seed=args.seed, pipeline_kwargs=_parse_sets(args.set),
        )  # fmt: skip
        print(f"wrote {out}")

    return _guard(generate)


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``svdquant inspect`` and ``hub_scripts/inspect_repo.py``."""
    p.add_argument("repo", help="a Hub repo id or a saved folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _hub_options(p)


def run_inspect(args: argparse.Namespace) -> int:
    """Print what a quantized repo holds."""

    def inspect() -> None:
        report = hub.inspect_repo(args.repo, revision=args.revision, token=args.token, endpoint=args.endpoint)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())

    return _guard(inspect)


def _guard(action) -> int:
    # Hub failures are expected outcomes of a command (bad token, missing repo): one clear line, not a traceback.
    try:
        action()
    except (hub.HubError, FileNotFoundError, ValueError) as e:
        print(f"svdquant: {e}", file=sys.stderr)
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``push``, ``pull``, ``generate`` and ``inspect`` to the ``svdquant`` command."""
    p = subparsers.add_parser("push", help="quantize a model (on load), save it with a model card, push it")
    add_push_arguments(p)
    p.set_defaults(func=run_push)
    p = subparsers.add_parser("pull", help="download a quantized repo into the Hub cache")
    add_pull_arguments(p)
    p.set_defaults(func=run_pull)
    p = subparsers.add_parser("generate", help="pull a quantized repo and generate an image")
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)
    p = subparsers.add_parser("inspect", help="what a quantized repo holds: layers, rank, sizes, format version")
    add_inspect_arguments(p)
    p.set_defaults(func=run_inspect)
