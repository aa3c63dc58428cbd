"""The FLUX.1 projection of ``bench_calibration.py``: from one measured run of FLUX.1-shaped blocks, the ``XᵀX``
passes the whole FLUX.1 transformer needs for each memory budget and the collection time they take, on this machine
(projected from the measured run) and on one GPU (an ESTIMATE from FLOPs and bytes, not measured)."""

from __future__ import annotations

import argparse
import re
import sys
import time

FLUX1_BLOCKS = (19, 38)  # FLUX.1's double and single transformer blocks


def kind(name: str) -> str:
    """A layer's name with its block index as ``*``: the same layer in every block of that kind."""
    return re.sub(r"^((?:single_)?transformer_blocks)\.\d+\.", r"\1.*.", name)


def _flux1_rows_and_sets(args: argparse.Namespace, b: dict, layers: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Per FLUX.1 layer: the input rows one denoiser call feeds it, and the layer whose XᵀX it shares (for those
    that share), both read off the bench's own run by layer kind. A kind that saw the bench's image + text tokens
    per call sees ``--project-tokens`` (single blocks), the image tokens alone the projected image tokens, the text
    tokens alone ``--project-text-tokens`` (a double block's add_*_proj, to_add_out, ff_context), anything else
    (the AdaLN linears: one row per call) the same rows as on the bench."""
    image, text = b["tokens_per_call"] - args.text_tokens, args.text_tokens
    if image == text:
        sys.exit("bench_calibration: the projection tells image from text rows by count; give --image-tokens and "
                 "--text-tokens different values")  # fmt: skip
    to_flux = {image + text: args.project_tokens, image: args.project_tokens - args.project_text_tokens,
               text: args.project_text_tokens}  # fmt: skip
    rows = {}
    for name in layers:
        seen = b["rows_per_call"][kind(name)]
        rows[name] = to_flux.get(seen, seen)
    sets = [set(kinds) for kinds in b["shared_kinds"]]
    together: dict[str, str] = {}
    for name in layers:
        found = next((kinds for kinds in sets if kind(name) in kinds), None)
        if found is None:
            continue
        block = re.match(r"^(?:single_)?transformer_blocks\.(\d+)\.", name)  # its set is in its block
        first = min(k.replace("*", block.group(1)) if block else k for k in found)
        if first != name:
            together[name] = first
    return rows, together


def pass_projection(args: argparse.Namespace, b: dict, runs: list[dict]) -> None:
    """The passes the whole FLUX.1 transformer needs for each XᵀX budget, and the collection time they take: on
    this machine (projected from the measured run) and on one GPU (an ESTIMATE from FLOPs, not measured).

    XᵀX is counted as calibrate does it: a sum that layers share (they read one input tensor) once, in memory, in
    the pass plan and in FLOPs; and each sum's FLOPs (2·rows·K²) at the rows its layers really see per call
    (:func:`_flux1_rows_and_sets`), not every layer at every token."""

    import torch

    from diffusers_svdquant import SVDQuantConfig
    from diffusers_svdquant.apps.model_zoo import flux_shaped
    from diffusers_svdquant.calibration.fixedpoint import FixedPointSum
    from diffusers_svdquant.calibration.packed import packed_size
    from diffusers_svdquant.calibration.passes import GIB
    from diffusers_svdquant.config import quantizable_linears

    # hessian_sum="fixed" converts each prompt's float32 sums to int64 once: measured here, per entry, on a sum of
    # FLUX.1's MLP width (900 MB of integers: from memory, as FLUX.1's are), after one warm-up add.
    item = torch.randn(packed_size(12288))
    fixed = FixedPointSum.from_statistics(torch.full((12288,), float(item.abs().max())), 1 << 20)
    fixed.add(0, item)
    start = time.perf_counter()
    fixed.add(1, item)
    fixed.add(2, item)
    convert_s = (time.perf_counter() - start) / (2 * item.numel())
    del item, fixed
    with torch.device("meta"):
        flux = flux_shaped(*FLUX1_BLOCKS)
    layers = quantizable_linears(flux, SVDQuantConfig())
    rows, together = _flux1_rows_and_sets(args, b, layers)
    sums = {n: m for n, m in layers.items() if n not in together}  # one XᵀX each
    weight = sum(m.in_features * m.out_features for m in layers.values())
    k2_all = sum(m.in_features**2 for m in layers.values())  # full K x K sums, as they were held before
    packed = sum(packed_size(m.in_features) for m in sums.values())  # the upper triangles now held
    calls = args.project_prompts * args.project_steps
    tokens = calls * args.project_tokens
    scale = tokens / (args.calls * b["tokens_per_call"])
    # The XᵀX work, packed entries x rows per sum: FLUX.1's over the whole workload, against the bench's measured.
    xtx_work = sum(packed_size(m.in_features) * rows[n] for n, m in sums.items()) * calls
    xtx_all_tokens = k2_all * tokens  # what the projection first counted: every layer, every token, full K x K
    # This machine, one process: the forwards (with the statistics hooks) scale with weight x tokens, the XᵀX
    # accumulation with its work. A later pass reruns the forwards (hooks on its group only).
    forwards = b["collect_plain_s"] * weight / b["rec_weight"] * scale
    xtx = (b["collect_s"] - b["collect_plain_s"]) * xtx_work / b["rec_xtx_work"]
    print(f"\nXᵀX passes for the full FLUX.1 transformer ({len(layers)} layers, {len(sums)} XᵀX sums, packed upper "
          f"triangles: {4 * packed / GIB:.1f} GiB of float32, {4 * k2_all / GIB:.1f} GiB as full K x K one per layer; "
          f"{args.project_prompts} prompts x "
          f"{args.project_steps} steps x {args.project_tokens} tokens, {args.project_text_tokens} of them "
          f"text):")  # fmt: skip
    print(f"  XᵀX work (rows x packed entries over the sums): {xtx_work / xtx_all_tokens:.3f} of every layer's "
          f"full K x K at every token")  # fmt: skip
    pb = b["collect_plain_s"] / b["collect_s"]
    for r in runs[1:]:
        model = (r["hessian_passes"] * pb + (1 - pb)) * b["collect_s"]
        print(f"  check on the bench: {r['hessian_passes']} passes collected in {r['collect_s']:.1f} s; "
              f"passes x forwards + XᵀX predicts {model:.1f} s")  # fmt: skip
    # GPU ESTIMATE: forward FLOPs (2 x weight x tokens, every layer at every token, + attention 4·T²·d per block)
    # at --gpu-tflops; XᵀX (2·rows·K² per sum) at the same bf16 rate: calibrate multiplies a bf16 model's 16-bit
    # rows on tensor cores with float32 output (hessian.tensor_core_moment); --gpu-fp32-tflops for float32 rows.
    attention = 4 * args.project_tokens**2 * 3072 * sum(FLUX1_BLOCKS) * calls
    gpu_fwd = (2 * weight * tokens + attention) / (args.gpu_tflops * 1e12)
    gpu_xtx = 2 * xtx_work / (args.gpu_tflops * 1e12)
    print(f"  GPU ESTIMATE (not measured): one pass of forwards {gpu_fwd / 60:.1f} min at {args.gpu_tflops:g} "
          f"TFLOP/s, XᵀX {gpu_xtx / 60:.1f} min at the same bf16 rate (float32 rows at {args.gpu_fp32_tflops:g} "
          f"TFLOP/s: {2 * xtx_work / (args.gpu_fp32_tflops * 1e12) / 60:.1f} min; every layer at every token with "
          f"its own sum, float32: {2 * xtx_all_tokens / (args.gpu_fp32_tflops * 1e12) / 60:.1f} min); each "
          f"prompt's sums go to host memory once: {4 * packed / GIB:.0f} GiB per prompt, all passes")  # fmt: skip
    # Fixed point: units from a probe (the first forward, 1/calls of a pass), 12·K² bytes per sum however many
    # prompts, and each prompt's sums converted once (this machine's measured rate; on a GPU memory-bound, ~0).
    # On a GPU the conversion (ops.fixed_point_add's kernel) is memory-bound: 20 bytes per packed entry per
    # conversion, once per prompt (fixed) or per call (fixed per call), at --gpu-tbps.
    gpu_convert = 20 * packed / (args.gpu_tbps * 1e12)
    print(f"  hessian_sum='fixed': converting a prompt's sums takes {convert_s * 1e9:.2f} ns per entry here, "
          f"{convert_s * packed / 60:.1f} min per prompt on this machine; GPU ESTIMATE {gpu_convert:.3f} s per "
          f"conversion of every sum at {args.gpu_tbps:g} TB/s (20 bytes per entry)")  # fmt: skip
    # GPTQ's own solve, at quantize time (not calibration): per layer a Cholesky inverse of its K x K XᵀX (~K³
    # FLOPs, each layer its own: the smoothing differs) and the error updates (2·N·K²), float32.
    solve = sum(m.in_features**3 + 2 * m.out_features * m.in_features**2 for m in layers.values())
    print(f"  GPTQ's solve when quantizing (not in the GPTQ + below): {solve / 1e12:.0f} TFLOP, GPU ESTIMATE "
          f"{solve / (args.gpu_fp32_tflops * 1e12):.0f} s at {args.gpu_fp32_tflops:g} TFLOP/s float32, plus "
          f"{sum(m.in_features for m in layers.values()) / 1e6:.1f} M column steps of a few small kernels each "
          f"(~50 µs per step: {sum(m.in_features for m in layers.values()) * 50e-6 / 60:.1f} min)")  # fmt: skip
    budgets = [float(x) for x in args.budgets_gib.split(",")]
    per_call_rows = [(m.in_features, rows[n]) for n, m in sums.items()]
    for xtx_prompts in (int(x) for x in args.project_xtx_prompts.split(",")):
        for target in args.project_rows_per_column.split(","):
            share = _kept_share(per_call_rows, None if target == "all" else int(target), xtx_prompts, args)
            _pass_plans(args, budgets, xtx_prompts, layers, together, forwards, xtx, convert_s * packed, gpu_fwd,
                        gpu_xtx, calls, gpu_convert, share)  # fmt: skip
    print(
        "  (budgets are per process; per sum: bytes per packed entry (about K²/2) held while recording; CPU h: this "
        "machine's measured rates, the calls split evenly between processes; GPU est.: FLOPs at the stated rates, "
        "n GPUs, host transfers not counted, the fixed-point conversions at --gpu-tbps; GPTQ +%: the passes after the "
        "first (only the XᵀX prompts), the XᵀX FLOPs and conversions against one pass of forwards, what a calibration "
        "without GPTQ runs besides its search)"
    )


def _kept_share(
    per_call_rows: list[tuple[int, float]], target: int | None, xtx_prompts: int, args: argparse.Namespace
) -> dict:
    """What calibrate's ``hessian_rows_per_column=target`` keeps of the XᵀX over ``xtx_prompts`` prompts, from each
    sum's ``(K, rows per call)``: ``work``, the XᵀX FLOPs against every call of every prompt; ``prompt``, the share
    of a prompt's conversions left (a sum is converted for a prompt when one of its calls was kept); ``call``, the
    share of a call's (fixed point per call); ``fractions``, the kept share of each distinct K (rows)."""
    from diffusers_svdquant.calibration.packed import packed_size
    from diffusers_svdquant.calibration.recorder import call_fraction

    steps = args.project_steps
    calls = xtx_prompts * steps
    whole = sum(packed_size(k) * r for k, r in per_call_rows) * args.project_prompts * steps
    work = prompt = call = 0.0
    fractions = {}
    for k, r in per_call_rows:
        f = call_fraction(target, k, round(r), calls)
        fractions[(k, round(r))] = f
        work += packed_size(k) * r * calls * f
        prompt += packed_size(k) * (1 - (1 - f) ** steps)
        call += packed_size(k) * f
    held = sum(packed_size(k) for k, _ in per_call_rows)
    return {"target": target, "work": work / whole, "prompt": prompt / held, "call": call / held,
            "fractions": fractions}  # fmt: skip


def _pass_plans(
    args, budgets, xtx_prompts, layers, together, forwards, xtx, convert, gpu_fwd, gpu_xtx, calls, gpu_convert, kept
) -> None:
    """One table of the projection: the passes and times for each process count, sum and budget, with XᵀX gathered
    over ``xtx_prompts`` of the prompts (the first pass runs every prompt, the later ones those alone) and, in fixed
    point, the calls ``kept`` keeps (:func:`_kept_share`; the tree sums every call). ``convert`` / ``gpu_convert``:
    seconds to convert every sum once, here / on a GPU (estimate)."""
    import math

    from diffusers_svdquant.calibration.passes import GIB, fixed_moment_bytes, moment_bytes, plan_passes, tree_copies

    xtx_prompts = min(xtx_prompts, args.project_prompts)
    frac = xtx_prompts / args.project_prompts
    dropped = ", ".join(f"K {k} x {r}: {f:.3f}" for (k, r), f in sorted(kept["fractions"].items()) if f < 1)
    print(f"\n  XᵀX over {xtx_prompts} of the {args.project_prompts} prompts (hessian_prompts), fixed point "
          f"keeping calls for {kept['target'] or 'every'} rows per column (hessian_rows_per_column): XᵀX FLOPs "
          f"{kept['work']:.3f} of every call's; conversions per prompt {kept['prompt']:.3f}, per call "
          f"{kept['call']:.3f} of every sum's" + (f"; the calls kept (K x rows per call: share) {dropped}"
                                                  if dropped else ""))  # fmt: skip
    print(f"  {'procs':>5} {'sum':>5} {'per sum':>7} {'XᵀX GiB':>8} " + " ".join(f"{f'{g:g} GiB: passes':>15} "
          f"{'CPU h':>7} {'GPU est. min':>12} {'GPTQ +%':>8}" for g in budgets))  # fmt: skip
    for n in (1, 8):
        share = math.ceil(xtx_prompts / n)
        copies = max(tree_copies(range(r * share, min((r + 1) * share, xtx_prompts))) for r in range(n))
        # "call": fixed point adding each call at once, what a model on a GPU does (8 bytes per packed entry, one
        # conversion per call: args.project_steps per prompt; the CPU figure is for converting per prompt).
        for mode in ("tree", "fixed", "call"):
            per = {"tree": lambda k, c=copies: moment_bytes(k, c), "fixed": fixed_moment_bytes,
                   "call": lambda k: fixed_moment_bytes(k, per_call=True)}[mode]  # fmt: skip
            sizes = [(name, per(m.in_features)) for name, m in layers.items()]
            held = {"tree": f"{copies} x 4", "fixed": "8 + 4", "call": "8"}[mode]
            line = f"  {n:>5} {mode:>5} {held:>7} "
            line += f"{sum(s for name, s in sizes if name not in together) / GIB:>8.0f} "
            for g in budgets:
                try:
                    k = len(plan_passes(sizes, budget_bytes=int(g * GIB), together=together))
                except ValueError:
                    line += f"{'too small':>15} {'-':>7} {'-':>12} {'-':>8} "
                    continue
                # The first pass runs every prompt; the later ones (and the probe's one forward) the XᵀX prompts.
                runs_ = 1 + (k - 1) * frac + (1 / calls if mode != "tree" or k > 1 else 0)
                # The tree sums every call of the XᵀX prompts; fixed point the calls `kept` keeps.
                work = frac if mode == "tree" else kept["work"]
                conv = convert * xtx_prompts * kept["prompt"] if mode != "tree" else 0
                cpu = (runs_ * forwards + xtx * work + conv) / n / 3600
                conversions = {"tree": 0, "fixed": xtx_prompts * kept["prompt"],
                               "call": xtx_prompts * args.project_steps * kept["call"]}[mode]  # fmt: skip
                gpu_xtx_all = gpu_xtx * work + gpu_convert * conversions
                gpu = (runs_ * gpu_fwd + gpu_xtx_all) / n
                extra = ((runs_ - 1) * gpu_fwd + gpu_xtx_all) / gpu_fwd
                line += f"{k:>15} {cpu:>7.0f} {gpu / 60:>12.1f} {100 * extra:>7.0f}% "
            print(line)
