"""What the loaders learn from a checkpoint's files before reading its tensors: shapes, and NaN / inf.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that gives every
tensor's dtype, shape and byte range (after the header). :func:`read_headers` parses it once per file;
:func:`checkpoint_shapes` feeds the loaders' tensor checks from it, and :class:`FiniteCheck` scans the
quantized layers' float tensors for NaN / inf straight from the file, on a native background thread
(``ops.FiniteScan``) started before the loader reads the weights, so that the check overlaps the load
(docs/design.md §5). :func:`check_finite` takes its result and scans in the foreground only what it did
not cover.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..linear import SVDQuantLinear

# safetensors dtype names of the float tensors the scan reads (the others are never quantized-layer floats).
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype name (``"BF16"``, …), shape and byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_headers(checkpoint_files: Iterable[str | os.PathLike] | None) -> dict[str, dict[str, TensorEntry]] | None:
    """Each safetensors file's tensors by name (``{file: {name: entry}}``), or None for other formats.

    Raises ``ValueError`` naming the file when its header cannot be read (a truncated or foreign file).
    """
    files = [os.fspath(f) for f in checkpoint_files or ()]
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    headers: dict[str, dict[str, TensorEntry]] = {}
    for f in files:
        try:
            with open(f, "rb") as h:
                (n,) = struct.unpack("<Q", h.read(8))
                start = 8 + n
                raw = json.loads(h.read(n))
            entries = {}
            for name, v in raw.items():
                if name != "__metadata__":
                    b, e = v["data_offsets"]
                    entries[name] = TensorEntry(v["dtype"], tuple(v["shape"]), start + b, start + e)
        except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"svdquant: cannot read the safetensors header of {f}: {err}") from err
        headers[f] = entries
    return headers


def checkpoint_shapes(headers: dict[str, dict[str, TensorEntry]] | None) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes by name over every file of :func:`read_headers`' result (None stays None)."""
    if headers is None:
        return None
    return {name: e.shape for entries in headers.values() for name, e in entries.items()}


class FiniteCheck:
    """The quantized layers' float tensors of a safetensors checkpoint, scanned for NaN / inf in the background.

    Args:
        headers: :func:`read_headers` of the checkpoint's files.
        layers: names of the quantized layers; their float tensors (``"<layer>.<tensor>"``) are scanned.

    Each file's ranges go to ``ops.FiniteScan``, which reads them (from the page cache the loader's mapping
    shares) on its own thread.
    """

    def __init__(self, headers: dict[str, dict[str, TensorEntry]], layers: set[str]) -> None:
        self._scans: list[tuple[ops.FiniteScan, list[str]]] = []
        self.covered: dict[str, torch.dtype] = {}  # name -> the dtype the file holds it in
        for path, entries in headers.items():
            # One pass per file in comprehensions: this runs inside from_pretrained, over every tensor.
            picked = [
                (n, e, _FLOAT_DTYPES[e.dtype])
                for n, e in entries.items()
                if e.dtype in _FLOAT_DTYPES and n.rpartition(".")[0] in layers
            ]
            if picked:
                ranges = [(e.begin, (e.end - e.begin) // d.itemsize, d) for _, e, d in picked]
                self.covered.update((n, d) for n, _, d in picked)
                self._scans.append((ops.FiniteScan(path, ranges), [n for n, _, _ in picked]))

    def bad(self) -> set[str]:
        """Wait for the scans; the names of the tensors holding NaN or ±inf in the file."""
        return {names[i] for scan, names in self._scans for i in scan.finish()}


def quantized_float_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``("<layer>.<tensor>", tensor)`` of every quantized layer's loaded floating-point tensor, in module order."""
    return [
        (f"{name}.{t_name}", t)
        for name, module in model.named_modules()
        if isinstance(module, SVDQuantLinear)
        for t_name, t in module._parameters.items()
        if t is not None and t.is_floating_point() and t.device.type != "meta"
    ]


def check_finite(
    model: nn.Module, started: FiniteCheck | None = None, tensors: list[tuple[str, torch.Tensor]] | None = None
) -> None:
    """Refuse a quantized model whose scales or 16-bit tensors hold NaN or infinity (a damaged checkpoint:
    its outputs would be all NaN), naming the first such layer and tensor in module order.

    ``started``: the scan of the checkpoint file the loader began before reading the weights; a tensor it
    covered (the model holds it in the file's dtype, so its values are the file's) takes its result. The rest
    (converted on the way in, or all of them without ``started``) get one pass of ``ops.first_nonfinite``.
    Either way the check costs about one read of those tensors, which their first use would pay anyway.
    ``tensors``: :func:`quantized_float_tensors` of ``model`` when the caller has them already.
    """
    if tensors is None:
        tensors = quantized_float_tensors(model)
    covered = started.covered if started is not None else {}
    hits = started.bad() if started is not None else set()
    rest = [i for i, (full, t) in enumerate(tensors) if covered.get(full) != t.dtype]
    bad = {i for i, (full, t) in enumerate(tensors) if full in hits and covered[full] == t.dtype} if hits else set()
    first = ops.first_nonfinite([tensors[i][1] for i in rest]) if rest else -1
    if first >= 0:
        bad.add(rest[first])
    if bad:
        layer, _, t_name = tensors[min(bad)][0].rpartition(".")
        raise ValueError(
            f"svdquant: layer {layer!r} holds NaN or infinite values in {t_name}: the checkpoint is damaged"
        )
