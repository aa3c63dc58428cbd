"""Calibration statistics and their file: what :func:`~diffusers_svdquant.calibrate` returns and the quantizers read.

Per layer: the per-input-channel absmax of its input (what smoothing needs), token counts, a
bounded uniform *bottom-k* sample of input rows (every row gets a pseudo-random key; the rows with
the smallest keys are kept, so merging two samples is again the bottom-k of the union and one
process and N processes keep exactly the same rows), and the searched ``(α, β)``. The file format
is docs/design.md §2.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..filemodes import as_new_files
from .packed import pack_moment, packed_size, packed_width, unpack_moment
from .tensorfile import write_tensors

logger = logging.getLogger(__name__)

FILE_FORMAT = "svdquant-calibration"
# 3: a file whose layers share XᵀX (the metadata's hessian_aliases). 4: its XᵀX are stored as their packed upper
# triangles (1-D, calibration/packed.py: half the bytes). A file with XᵀX is written as version 4, so an older
# reader, which would take a packed vector for a matrix, refuses it; without XᵀX a file is still version 2.
FILE_FORMAT_VERSION = 4
_ALIASES = "hessian_aliases"
DEFAULT_MAX_SAMPLES = 128
# With neither a searched nor a configured α, SmoothQuant's default migration strength.
DEFAULT_ALPHA = 0.5
# Prefixes of the tensors in a statistics file; module names never contain ":".
_ABSMAX, _SMOOTHING, _ERRORS, _SAMPLES, _KEYS = "act_absmax:", "smoothing:", "search_error:", "samples:", "sample_keys:"
HESSIAN_PREFIX = "hessian:"


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
        hessian: name → float32 ``[K, K]`` ``XᵀX`` over every input row seen (``calibrate(hessian=True)``),
            what GPTQ rounds the residual against, held in memory. Layers that read the very same input tensors
            (attention's ``to_q`` / ``to_k`` / ``to_v``) map to the very same tensor: held once, not to be changed
            in place.
        hessian_files: name → the safetensors file holding that layer's ``XᵀX`` on disk (a loaded statistics
            file, or the shards of ``calibrate(..., hessian_passes=N)``): read one layer at a time
            (:meth:`hessian_for`), so quantizing and saving hold one ``K x K`` matrix, not all of them.
        hessian_alias: name → the layer whose name that layer's ``XᵀX`` is stored under in its file, for layers
            that share one (a file holds a shared sum once); a layer not in it is stored under its own name.
        hessian_rows: name → the input rows its ``XᵀX`` summed (fewer than ``num_tokens`` with calibrate's
            ``hessian_prompts`` / ``hessian_rows_per_column``): what GPTQ's damping reads (:meth:`xtx_rows`).
        info: how the statistics were made (processes, prompts, steps, rank, ...), JSON-safe.
    """

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: dict[str, int] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_keys: dict[str, torch.Tensor] = field(default_factory=dict)
    smoothing: dict[str, tuple[float, float]] = field(default_factory=dict)
    search_errors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_files: dict[str, str] = field(default_factory=dict, repr=False)
    hessian_alias: dict[str, str] = field(default_factory=dict, repr=False)
    hessian_rows: dict[str, int] = field(default_factory=dict)
    # What keeps a temporary folder of hessian_files alive (calibration.passes.TemporaryFolder); copies share it.
    hessian_folder: Any = field(default=None, repr=False, compare=False)

    def hessian_for(self, name: str) -> torch.Tensor | None:
        """Layer ``name``'s ``XᵀX`` ``[K, K]`` float32, or None when it was not gathered."""
        if name in self.hessian:
            return self.hessian[name]
        stored = self._stored_hessian(name)
        return None if stored is None else unpack_moment(stored) if stored.dim() == 1 else stored

    def _stored_hessian(self, name: str) -> torch.Tensor | None:
        """Layer ``name``'s ``XᵀX`` as its file holds it: packed ``[packed_size(K)]`` (version 4 and the shards) or
        ``[K, K]`` (versions 2 and 3); None when no file holds it."""
        if name not in self.hessian_files:
            return None
        from safetensors import safe_open

        with safe_open(self.hessian_files[name], framework="pt") as f:
            return f.get_tensor(HESSIAN_PREFIX + self.hessian_alias.get(name, name))

    def xtx_rows(self, name: str) -> int | None:
        """The input rows layer ``name``'s ``XᵀX`` summed: :attr:`hessian_rows`, or every row seen (files from before
        it was recorded summed them all unless made with ``hessian_prompts``); None when unknown."""
        return self.hessian_rows.get(name, self.num_tokens.get(name))

    def hessian_names(self) -> list[str]:
        """The layers whose ``XᵀX`` was gathered, sorted."""
        return sorted(set(self.hessian) | set(self.hessian_files))

    def _hessian_width(self, name: str) -> int:
        """``K`` of layer ``name``'s ``XᵀX``, read from the file's header when it is on disk."""
        if name in self.hessian:
            return int(self.hessian[name].shape[0])
        from safetensors import safe_open

        with safe_open(self.hessian_files[name], framework="pt") as f:
            return _stored_width(f.get_slice(HESSIAN_PREFIX + self.hessian_alias.get(name, name)).get_shape())

    def hessian_shared(self) -> dict[str, str]:
        """Layer → the first layer (in :meth:`hessian_names` order) holding the very same ``XᵀX``, for each layer
        that shares one with an earlier layer: the same tensor in memory, or the same tensor of the same file."""
        first: dict[tuple, str] = {}
        shared = {}
        for name in self.hessian_names():
            if name in self.hessian:
                source: tuple = ("memory", id(self.hessian[name]))
            else:
                source = ("file", self.hessian_files[name], self.hessian_alias.get(name, name))
            held = first.setdefault(source, name)
            if held != name:
                shared[name] = held
        return shared

    @property
    def has_hessian(self) -> bool:
        """Whether any layer's ``XᵀX`` was gathered."""
        return bool(self.hessian or self.hessian_files)

    def smoothing_for(
        self, name: str, alpha: float | None, weight_only: bool = False
    ) -> tuple[torch.Tensor | None, float, float]:
        """What quantizing layer ``name`` uses: ``(act_absmax or None, α, β)``.

        An explicit ``alpha`` (``SVDQuantConfig.smoothing_alpha``) applies to every layer with
        ``β = 1 − α``; otherwise the searched pair, or ``(0.5, 0.5)`` where none was searched.
        The search scores W4A4 error, so a ``weight_only`` layer takes ``(0.5, 0.5)`` instead (measured on
        real MiniLM, every linear W4A16 rank 32: 0.987 mean cosine at 0.5 against 0.985 with the W4A4
        search's pairs). Without statistics for the layer, λ = 1 whatever α is.
        """
        absmax = self.act_absmax.get(name)
        if alpha is None and weight_only:
            alpha = DEFAULT_ALPHA
        if alpha is not None:
            return absmax, float(alpha), 1.0 - float(alpha)
        a, b = self.smoothing.get(name, (DEFAULT_ALPHA, 1.0 - DEFAULT_ALPHA))
        return absmax, a, b

    def save(self, path: str | os.PathLike, include_samples: bool = False) -> None:
        """Write a safetensors file that ``SVDQuantConfig(calibration=path)`` reads.

        The file is written beside ``path`` and renamed over it, so a failed save leaves any
        previous file intact. Samples (``S x K`` per layer) are left out unless asked for: the
        quantizer needs only the absmax and the searched ``(α, β)``. Each ``XᵀX`` is written as its packed upper
        triangle (half the bytes; :mod:`~.packed`), and one that layers share (:meth:`hessian_shared`) once
        (safetensors holds no two tensors on one buffer, and it would cost the bytes twice), the others named in
        the metadata's ``hessian_aliases``.
        """
        tensors = {_ABSMAX + k: v.float().contiguous() for k, v in self.act_absmax.items()}
        tensors |= {_SMOOTHING + k: torch.tensor(v, dtype=torch.float64) for k, v in self.smoothing.items()}
        tensors |= {_ERRORS + k: v.double().contiguous() for k, v in self.search_errors.items()}
        if include_samples:
            tensors |= {_SAMPLES + k: v.contiguous() for k, v in self.samples.items()}
            tensors |= {_KEYS + k: v.contiguous() for k, v in self.sample_keys.items()}
        meta = {
            "format": FILE_FORMAT,
            "format_version": "2",
            "num_tokens": json.dumps(self.num_tokens),
            "info": json.dumps(self.info),
        }
        if self.hessian_rows:
            meta["hessian_rows"] = json.dumps(self.hessian_rows)
        # A shared XᵀX is written once, under its first layer's name, the others named in the metadata.
        shared = self.hessian_shared()
        if self.has_hessian:
            meta["format_version"] = str(FILE_FORMAT_VERSION)
        if shared:
            meta[_ALIASES] = json.dumps(shared)
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        # The sums are read (from disk, when they are there) one at a time as they are written, packed.
        shapes |= {
            HESSIAN_PREFIX + k: (torch.float32, (packed_size(self._hessian_width(k)),))
            for k in self.hessian_names()
            if k not in shared
        }
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.close(fd)

        def read(key: str) -> torch.Tensor:
            if key in tensors:
                return tensors[key]
            name = key[len(HESSIAN_PREFIX) :]
            if name in self.hessian:
                return pack_moment(self.hessian[name])
            stored = self._stored_hessian(name)  # read once; packed on disk already: copied as it is
            return stored.float().contiguous() if stored.dim() == 1 else pack_moment(stored)

        try:
            write_tensors(tmp, shapes, read, meta)
            as_new_files([tmp])
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by :meth:`save` (or a version-1 file of bare ``name → [K]`` absmax, a version-2 file,
        which has no shared ``XᵀX``, or a version-3 file, whose ``XᵀX`` are full ``[K, K]``)."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                # The K x K moments stay on disk until a layer is quantized (hessian_for).
                tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(HESSIAN_PREFIX)}
                hessian_files = {k[len(HESSIAN_PREFIX) :]: path for k in f.keys() if k.startswith(HESSIAN_PREFIX)}
                f_shapes = {n: f.get_slice(HESSIAN_PREFIX + n).get_shape() for n in hessian_files}
        except Exception as e:
            raise ValueError(f"{path!r} is not a safetensors calibration file: {e}") from e
        try:
            version = int(meta.get("format_version", "1"))
        except ValueError as e:
            raise ValueError(f"{path!r} is not a calibration file: format_version {meta['format_version']!r}") from e
        if version >= 2 and meta.get("format") != FILE_FORMAT:
            raise ValueError(
                f"{path!r} is not a calibration file (its metadata says format {meta.get('format')!r}, expected "
                f"{FILE_FORMAT!r}); pass what diffusers_svdquant.calibrate() saved, not a model's weights"
            )
        if version > FILE_FORMAT_VERSION:
            raise ValueError(
                f"calibration file {path!r} has format_version {version}; this diffusers-svdquant reads up to "
                f"{FILE_FORMAT_VERSION}: upgrade the package"
            )
        if version == 1:
            _check_version1_absmax(path, tensors)
            return cls(tensors, ast.literal_eval(meta.get("num_tokens", "{}")))

        def section(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        for name in hessian_files:  # headers only: a matrix or a packed triangle, of the layer's width
            _check_hessian_shape(path, name, f_shapes[name], tensors.get(_ABSMAX + name))
        aliases = json.loads(meta.get(_ALIASES, "{}"))
        missing = {a: n for a, n in aliases.items() if n not in hessian_files}
        if missing:
            raise ValueError(f"{path!r}: {_ALIASES} names XᵀX the file does not hold: {missing}")
        hessian_files |= dict.fromkeys(aliases, path)

        return cls(
            act_absmax=section(_ABSMAX),
            num_tokens={k: int(v) for k, v in json.loads(meta.get("num_tokens", "{}")).items()},
            samples=section(_SAMPLES),
            sample_keys=section(_KEYS),
            smoothing={k: (float(v[0]), float(v[1])) for k, v in section(_SMOOTHING).items()},
            search_errors=section(_ERRORS),
            info=json.loads(meta.get("info", "{}")),
            hessian_files=hessian_files,
            hessian_alias=aliases,
            hessian_rows={k: int(v) for k, v in json.loads(meta.get("hessian_rows", "{}")).items()},
        )

    def __repr__(self) -> str:
        widths = sorted({int(v.shape[-1]) for v in self.act_absmax.values()})
        span = f"{widths[0]}-{widths[-1]}" if len(widths) > 1 else (str(widths[0]) if widths else "0")
        rows = sorted({int(v.shape[0]) for v in self.samples.values()})
        made_from = self.info.get("model_class")
        return (
            f"CalibrationStats({len(self.act_absmax)} layers, {span} input channels, "
            f"{rows[-1] if rows else 0} sampled rows per layer at most, {len(self.smoothing)} searched"
            + (f", from {made_from}" if made_from else "")
            + ")"
        )

    @classmethod
    def merge(cls, parts: Sequence[CalibrationStats], max_samples: int = DEFAULT_MAX_SAMPLES) -> CalibrationStats:
        """Exact union of statistics gathered on disjoint inputs (e.g. one part per process).

        Absmax is the elementwise max, token counts add up, samples are the bottom-``max_samples``
        rows of the union by key; the result does not depend on the order of ``parts``.
        ``XᵀX`` adds up in the order of ``parts`` (:func:`~diffusers_svdquant.calibrate` merges its
        processes' by item instead, exactly). Search results and ``info`` come from the parts that have them.
        """
        out = cls()
        for part in parts:
            for name, m in part.act_absmax.items():
                prev = out.act_absmax.get(name)
                out.act_absmax[name] = m.clone() if prev is None else torch.maximum(prev, m)
            for name, n in part.num_tokens.items():
                out.num_tokens[name] = out.num_tokens.get(name, 0) + n
            for name, n in part.hessian_rows.items():
                out.hessian_rows[name] = out.hessian_rows.get(name, 0) + n
            for name, rows in part.samples.items():
                keep_bottom_k(out, name, part.sample_keys[name], rows, max_samples)
            for name in part.hessian_names():
                h = part.hessian_for(name)
                out.hessian[name] = h.clone() if name not in out.hessian else out.hessian[name] + h
            out.smoothing.update(part.smoothing)
            out.search_errors.update(part.search_errors)
            out.info.update(part.info)
        return out


def _check_version1_absmax(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A version-1 file is bare ``name -> [K]`` absmax: refuse anything else (a model's weights file would
    otherwise become "statistics", 2-D and negative values included)."""
    for name, t in tensors.items():
        if t.dim() != 1 or not t.is_floating_point() or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(
                f"{path!r} is not a calibration file: tensor {name!r} ({t.dtype} {list(t.shape)}) is not a "
                f"per-channel absmax (1-D, finite, >= 0); pass what diffusers_svdquant.calibrate() saved"
            )


def _stored_width(shape: Sequence[int]) -> int | None:
    """``K`` of a stored ``XᵀX`` of this shape: ``[K, K]`` (versions 2 and 3) or a packed upper triangle (version 4);
    None for any other shape."""
    if len(shape) == 2 and shape[0] == shape[1]:
        return int(shape[0])
    if len(shape) == 1:
        try:
            return packed_width(shape[0])
        except ValueError:
            return None
    return None


def _check_hessian_shape(path: str, name: str, shape: list[int], absmax: torch.Tensor | None) -> None:
    """A stored ``XᵀX`` is ``[K, K]`` or a packed upper triangle (:func:`_stored_width`), ``K`` the layer's."""
    k = _stored_width(shape)
    if k is None or (absmax is not None and absmax.numel() != k):
        raise ValueError(
            f"{path!r}: hessian:{name} is {shape}, not the [K, K] XᵀX of a layer of width "
            f"{absmax.numel() if absmax is not None else 'K'} nor its packed upper triangle"
        )


def keep_bottom_k(stats: CalibrationStats, name: str, keys: torch.Tensor, rows: torch.Tensor, k: int) -> None:
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
