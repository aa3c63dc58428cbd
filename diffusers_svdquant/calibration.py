"""Calibration: activation statistics over real inputs, and the per-layer smoothing search.

SVDQuant's smoothing ``λ_j = max|X_j|^α / max|W_j|^β`` needs ``max|X_j|`` per layer, and picking
``(α, β)`` well needs real input rows to score candidates on. :func:`calibrate` runs the 16-bit
model (or a whole diffusers pipeline over prompts and denoising steps) with forward pre-hooks that
record, per target linear, the per-input-channel absmax and a bounded uniform sample of input
rows; then it searches ``(α, β)`` per layer (:func:`diffusers_svdquant.algorithm.search_smoothing`).

Across processes (``torchrun`` / ``accelerate launch --multi_gpu``, CPU or GPU): prompts are split
between ranks, the statistics are merged exactly (max, sums, bottom-k samples), the layer search
is split between ranks, and every rank ends with the same :class:`CalibrationStats`, so rank 0
writes it. The row sample is a *bottom-k* sample: every row gets a pseudo-random key derived from
(layer, prompt index, call, row), and the rows with the ``max_samples`` smallest keys are kept.
That is a uniform sample, and merging two of them is again the bottom-k of the union, so one
process and N processes keep exactly the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import algorithm, reference

logger = logging.getLogger(__name__)

FILE_FORMAT = "svdquant-calibration"
FILE_FORMAT_VERSION = 2
DEFAULT_MAX_SAMPLES = 128
# With neither a searched nor a configured α, SmoothQuant's default migration strength.
DEFAULT_ALPHA = 0.5
# Prefixes of the tensors in a statistics file; module names never contain ":".
_ABSMAX, _SMOOTHING, _ERRORS, _SAMPLES, _KEYS = "act_absmax:", "smoothing:", "search_error:", "samples:", "sample_keys:"


@dataclass
class CalibrationStats:
    """Per-layer calibration results; names are ``named_modules()`` names of the calibrated model.

    Attributes:
        act_absmax: name → float32 ``[K]``, the absmax of each input channel over every token seen.
        num_tokens: name → number of input rows seen.
        samples: name → ``[S, K]`` (the model dtype) uniformly sampled input rows, ``S <= max_samples``.
        sample_keys: name → float64 ``[S]`` the rows' sampling keys (what makes samples mergeable).
        smoothing: name → ``(α, β)`` found by the search.
        search_errors: name → float64 ``[2]``: relative output error after quantization with the
            searched ``(α, β)`` and with no smoothing, on the samples.
        info: how the statistics were made (processes, prompts, steps, rank, ...), JSON-safe.
    """

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: dict[str, int] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_keys: dict[str, torch.Tensor] = field(default_factory=dict)
    smoothing: dict[str, tuple[float, float]] = field(default_factory=dict)
    search_errors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def smoothing_for(self, name: str, alpha: float | None) -> tuple[torch.Tensor | None, float, float]:
        """What quantizing layer ``name`` uses: ``(act_absmax or None, α, β)``.

        An explicit ``alpha`` (``SVDQuantConfig.smoothing_alpha``) applies to every layer with
        ``β = 1 − α``; otherwise the searched pair, or ``(0.5, 0.5)`` where none was searched.
        Without statistics for the layer, λ = 1 whatever α is.
        """
        absmax = self.act_absmax.get(name)
        if alpha is not None:
            return absmax, float(alpha), 1.0 - float(alpha)
        a, b = self.smoothing.get(name, (DEFAULT_ALPHA, 1.0 - DEFAULT_ALPHA))
        return absmax, a, b

    def save(self, path: str | os.PathLike, include_samples: bool = False) -> None:
        """Write a safetensors file that ``SVDQuantConfig(calibration=path)`` reads.

        The file is written beside ``path`` and renamed over it, so a failed save leaves any
        previous file intact. Samples (``S x K`` per layer) are left out unless asked for: the
        quantizer needs only the absmax and the searched ``(α, β)``.
        """
        from safetensors.torch import save_file

        tensors = {_ABSMAX + k: v.float().contiguous() for k, v in self.act_absmax.items()}
        tensors |= {_SMOOTHING + k: torch.tensor(v, dtype=torch.float64) for k, v in self.smoothing.items()}
        tensors |= {_ERRORS + k: v.double().contiguous() for k, v in self.search_errors.items()}
        if include_samples:
            tensors |= {_SAMPLES + k: v.contiguous() for k, v in self.samples.items()}
            tensors |= {_KEYS + k: v.contiguous() for k, v in self.sample_keys.items()}
        meta = {
            "format": FILE_FORMAT,
            "format_version": str(FILE_FORMAT_VERSION),
            "num_tokens": json.dumps(self.num_tokens),
            "info": json.dumps(self.info),
        }
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by :meth:`save` (or a version-1 file of bare ``name → [K]`` absmax)."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{path!r} is not a safetensors calibration file: {e}") from e
        version = int(meta.get("format_version", "1"))
        if version > FILE_FORMAT_VERSION:
            raise ValueError(
                f"calibration file {path!r} has format_version {version}; this diffusers-svdquant reads up to "
                f"{FILE_FORMAT_VERSION}: upgrade the package"
            )
        if version == 1:
            import ast

            return cls(tensors, ast.literal_eval(meta.get("num_tokens", "{}")))

        def section(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(
            act_absmax=section(_ABSMAX),
            num_tokens={k: int(v) for k, v in json.loads(meta.get("num_tokens", "{}")).items()},
            samples=section(_SAMPLES),
            sample_keys=section(_KEYS),
            smoothing={k: (float(v[0]), float(v[1])) for k, v in section(_SMOOTHING).items()},
            search_errors=section(_ERRORS),
            info=json.loads(meta.get("info", "{}")),
        )

    @classmethod
    def merge(cls, parts: Sequence[CalibrationStats], max_samples: int = DEFAULT_MAX_SAMPLES) -> CalibrationStats:
        """Exact union of statistics gathered on disjoint inputs (e.g. one part per process).

        Absmax is the elementwise max, token counts add up, samples are the bottom-``max_samples``
        rows of the union by key; the result does not depend on the order of ``parts``.
        Search results and ``info`` come from the parts that have them.
        """
        out = cls()
        for part in parts:
            for name, m in part.act_absmax.items():
                prev = out.act_absmax.get(name)
                out.act_absmax[name] = m.clone() if prev is None else torch.maximum(prev, m)
            for name, n in part.num_tokens.items():
                out.num_tokens[name] = out.num_tokens.get(name, 0) + n
            for name, rows in part.samples.items():
                _keep_bottom_k(out, name, part.sample_keys[name], rows, max_samples)
            out.smoothing.update(part.smoothing)
            out.search_errors.update(part.search_errors)
            out.info.update(part.info)
        return out


def _keep_bottom_k(stats: CalibrationStats, name: str, keys: torch.Tensor, rows: torch.Tensor, k: int) -> None:
    """Merge ``rows`` (with ``keys``) into ``stats.samples[name]``, keeping the ``k`` smallest keys."""
    if name in stats.samples:
        keys = torch.cat((stats.sample_keys[name], keys))
        rows = torch.cat((stats.samples[name], rows))
    if keys.numel() > k:
        # Sorting (not topk) keeps the kept rows in key order, so equal sets give equal tensors.
        idx = torch.argsort(keys, stable=True)[:k]
    else:
        idx = torch.argsort(keys, stable=True)
    stats.sample_keys[name] = keys[idx]
    stats.samples[name] = rows[idx]


def load_calibration(calibration: Any) -> CalibrationStats:
    """The statistics a config's ``calibration`` names: None, a file path, a :class:`CalibrationStats`,
    or a mapping ``name → [K]`` absmax."""
    if calibration is None:
        return CalibrationStats()
    if isinstance(calibration, CalibrationStats):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        if not os.path.isfile(calibration):
            raise FileNotFoundError(f"SVDQuantConfig: calibration file {os.fspath(calibration)!r} does not exist")
        return CalibrationStats.load(calibration)
    if isinstance(calibration, Mapping):
        return CalibrationStats(act_absmax=dict(calibration))
    raise TypeError(
        f"SVDQuantConfig: calibration must be a path, a CalibrationStats or a mapping, got {type(calibration).__name__}"
    )


class _Recorder:
    """Forward pre-hooks that fill a :class:`CalibrationStats` (absmax, token counts, row samples)."""

    def __init__(self, max_samples: int, seed: int) -> None:
        self.stats = CalibrationStats()
        self.max_samples = max_samples
        self.seed = seed
        self.item = 0  # index of the prompt (or run) being processed: part of every row's key
        self._calls: dict[str, int] = {}

    def start_item(self, item: int) -> None:
        self.item = item
        self._calls = {}

    def hook(self, name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            x2 = x.reshape(-1, x.shape[-1])
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            if x2.shape[0] == 0:
                return
            stats = self.stats
            m = x2.abs().amax(dim=0).float().cpu()
            prev = stats.act_absmax.get(name)
            stats.act_absmax[name] = m if prev is None else torch.maximum(prev, m)
            stats.num_tokens[name] = stats.num_tokens.get(name, 0) + x2.shape[0]
            if self.max_samples:
                keys = self._keys(name, call, x2.shape[0])
                if keys.numel() > self.max_samples:
                    idx = torch.argsort(keys, stable=True)[: self.max_samples]
                    keys, rows = keys[idx], x2[idx.to(x2.device)]
                else:
                    rows = x2
                _keep_bottom_k(stats, name, keys, rows.cpu().clone(), self.max_samples)

        return record

    def _keys(self, name: str, call: int, rows: int) -> torch.Tensor:
        # crc32, not hash(): Python salts str hashes per process and every rank must agree.
        seed = zlib.crc32(f"{self.seed}/{name}/{self.item}/{call}".encode())
        return torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _target_linears(model: nn.Module, config: Any | None, module_filter: Callable | None) -> dict[str, nn.Linear]:
    if config is not None:
        from .quantizer import quantizable_linears

        layers = quantizable_linears(model, config)
    else:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if module_filter is not None:
        layers = {n: m for n, m in layers.items() if module_filter(n, m)}
    return layers


class _Processes:
    """The process group calibration runs in: accelerate's state when launched with several
    processes, otherwise a lone process (no process group is created)."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # Without a GPU, a plain PartialState() treats each launched process as a lone one;
            # cpu=True makes them join one gloo group.
            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def my_share(self, n: int) -> list[int]:
        """Contiguous block of ``range(n)`` for this rank (accelerate's split)."""
        if self.world == 1:
            return list(range(n))
        with self.state.split_between_processes(list(range(n))) as part:
            return list(part)


def _is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _denoiser_name(pipe: Any) -> str:
    for name in ("transformer", "unet"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no `transformer` or `unet`; pass component=... to calibrate")


def calibrate(
    target: Any,
    run: Callable[[nn.Module], Any] | None = None,
    *,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int = 8,
    component: str | None = None,
    config: Any | None = None,
    module_filter: Callable[[str, nn.Linear], bool] | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    search: bool | None = None,
    seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Collect activation statistics with the 16-bit model and search each layer's smoothing.

    Two ways to drive the model::

        stats = calibrate(pipe, prompts=[...], num_inference_steps=8)   # a diffusers pipeline
        stats = calibrate(model, run=lambda m: m(**batch))                # any module + a callable

    With a pipeline, its denoiser (``component``, default ``transformer`` or ``unet``) is hooked
    and the pipeline generates every prompt (default: :data:`~diffusers_svdquant.prompts.CALIBRATION_PROMPTS`)
    with ``generator = manual_seed(seed + i)`` and ``output_type="latent"``; under several
    processes the prompts are split between them. With ``run``, each process calls ``run(model)``
    once (split the data yourself when launching several).

    Args:
        target: a ``DiffusionPipeline`` or an ``nn.Module``.
        run: with a module, called once with it, under ``torch.no_grad``.
        prompts: with a pipeline, the calibration prompts.
        num_inference_steps: with a pipeline, denoising steps per prompt.
        component: with a pipeline, the attribute name of the module to calibrate.
        config: an :class:`~diffusers_svdquant.SVDQuantConfig`: only the layers it quantizes are
            recorded, and its ``rank`` / ``svd_method`` are what the search scores with. Default:
            ``SVDQuantConfig()`` with a pipeline; every ``nn.Linear`` (and rank 32) with a module.
        module_filter: ``(name, linear) -> bool`` to restrict the recorded layers further.
        max_samples: input rows kept per layer for the search (0: none, no search).
        search: search ``(α, β)`` per layer (default: when ``max_samples > 0``).
        seed: seeds the pipeline's generators and the row sampling.
        pipeline_kwargs: extra arguments for every pipeline call (``height``, ``guidance_scale``...).
        progress: tqdm bars on rank 0.

    Returns:
        :class:`CalibrationStats` (float32 ``[K]`` absmax on the CPU), the same on every rank.
    """
    procs = _Processes()
    search = max_samples > 0 if search is None else search
    if search and max_samples <= 0:
        raise ValueError("calibrate: search=True needs max_samples > 0 input rows per layer")
    if _is_pipeline(target):
        if run is not None:
            raise ValueError("calibrate: pass prompts for a pipeline, run= only for a module")
        from .config import SVDQuantConfig
        from .prompts import CALIBRATION_PROMPTS

        component = component or _denoiser_name(target)
        model = getattr(target, component, None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"calibrate: pipeline {type(target).__name__} has no module component {component!r}")
        config = config if config is not None else SVDQuantConfig()
        prompts = list(CALIBRATION_PROMPTS if prompts is None else prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("calibrate: prompts must be a non-empty list of strings")
        if num_inference_steps < 1:
            raise ValueError(f"calibrate: num_inference_steps must be >= 1, got {num_inference_steps}")

        def drive(recorder: _Recorder) -> None:
            mine = procs.my_share(len(prompts))
            kwargs = {"num_inference_steps": num_inference_steps, "output_type": "latent"} | (pipeline_kwargs or {})
            bar = _bar(mine, "calibration prompts", progress and procs.rank == 0)
            target.set_progress_bar_config(disable=True)
            for i in bar:
                recorder.start_item(i)
                device = getattr(target, "device", torch.device("cpu"))
                gen = torch.Generator(device=device).manual_seed(seed + i)
                target(prompt=prompts[i], generator=gen, **kwargs)

        info = {"prompts": len(prompts), "num_inference_steps": num_inference_steps, "component": component}
    else:
        if not isinstance(target, nn.Module) or run is None:
            raise TypeError("calibrate: pass a DiffusionPipeline (with prompts) or an nn.Module with run=callable")
        model = target

        def drive(recorder: _Recorder) -> None:
            recorder.start_item(procs.rank)
            run(model)

        info = {}

    layers = _target_linears(model, config, module_filter)
    recorder = _Recorder(max_samples, seed)
    handles = [m.register_forward_pre_hook(recorder.hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        with torch.no_grad():
            drive(recorder)
    finally:
        for h in handles:
            h.remove()
    stats = CalibrationStats.merge(procs.gather(recorder.stats), max_samples)
    stats.info = info | {"num_processes": procs.world, "max_samples": max_samples, "seed": seed}
    if search:
        search_smoothing(model, stats, config, procs=procs, progress=progress)
    return stats


def _bar(items: Sequence[Any], desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, leave=False)


def search_smoothing(
    model: nn.Module,
    stats: CalibrationStats,
    config: Any | None = None,
    *,
    procs: _Processes | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Fill ``stats.smoothing`` / ``stats.search_errors`` by :func:`algorithm.search_smoothing` per layer.

    Layers with samples whose K is a multiple of 64 and ``rank <= min(N, K)`` are searched; under
    several processes the layers are dealt round-robin by size between ranks and the results
    gathered, so every rank returns the same statistics.

    Args:
        model: the 16-bit module the statistics were collected on (its weights are scored).
        stats: from the collection step, with ``samples``.
        config: ``rank`` and ``svd_method`` to score with (default rank 32, ``"auto"``).

    Returns:
        ``stats``, updated in place.
    """
    procs = procs or _Processes()
    rank = getattr(config, "rank", 32)
    svd_method = getattr(config, "svd_method", "auto")
    todo = []
    for name, rows in stats.samples.items():
        weight = model.get_submodule(name).weight
        n, k = weight.shape
        if k % reference.GROUP_SIZE == 0 and rank <= min(n, k) and rows.shape[0] > 0:
            todo.append((n * k, name))
    # Largest first, dealt round-robin: the ranks' shares of work stay within one layer of each other.
    todo = [name for _, name in sorted(todo, key=lambda t: (-t[0], t[1]))][procs.rank :: procs.world]
    found: dict[str, tuple[float, float, torch.Tensor]] = {}
    for name in _bar(todo, "smoothing search", progress and procs.rank == 0):
        weight = model.get_submodule(name).weight.detach()
        result = algorithm.search_smoothing(
            weight, stats.act_absmax[name], stats.samples[name], rank, dtype=weight.dtype, svd_method=svd_method
        )
        found[name] = (result.alpha, result.beta, torch.stack((torch.tensor(result.error), result.errors[0])))
    for part in procs.gather(found):
        for name, (a, b, errs) in part.items():
            stats.smoothing[name] = (a, b)
            stats.search_errors[name] = errs.double()
    stats.info |= {"search_rank": rank, "svd_method": svd_method}
    return stats
