"""``svdquant push | pull | generate | inspect``: the Hub workflow as subcommands (thin over :mod:`.hub`).

    svdquant push SOURCE REPO_ID [--subfolder transformer] [--rank R] [--calibration STATS.safetensors]
    svdquant pull REPO_ID [--revision REV] [--subfolder transformer] [--cache-dir DIR]
    svdquant generate REPO_ID --prompt TEXT --out image.png [--base PIPELINE_REPO]
    svdquant inspect REPO_ID_OR_FOLDER [--revision REV] [--json]

Errors from the Hub (bad token, missing repo, a repo holding another model, a dropped upload) print one message
naming the repo and its state, and exit with status 1. The options are in :mod:`svdquant_cli.arguments`
(``add_push_arguments`` ...); this module runs the parsed commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import hub


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


def run_pull(args: argparse.Namespace) -> int:
    """Download into the cache; prints the snapshot folder and how to load it."""

    def pull() -> None:
        path = hub.pull(args.repo_id, revision=args.revision, subfolder=args.subfolder, cache_dir=args.cache_dir,
                        token=args.token, endpoint=args.endpoint)  # fmt: skip
        print(path)

    return _guard(pull)


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


def run_inspect(args: argparse.Namespace) -> int:
    """Print what a quantized repo holds."""

    def inspect() -> None:
        report = hub.inspect_repo(args.repo, revision=args.revision, token=args.token, endpoint=args.endpoint)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
        if args.verify:
            hub.verify_repo(args.repo, revision=args.revision, token=args.token, endpoint=args.endpoint)
            print("checksums: every tensor matches the saved checksums")

    return _guard(inspect)


def _guard(action) -> int:
    # Hub failures are expected outcomes of a command (bad token, missing repo): one clear line, not a traceback.
    try:
        action()
    except (hub.HubError, FileNotFoundError, ValueError) as e:
        print(f"svdquant: {e}", file=sys.stderr)
        return 1
    return 0
