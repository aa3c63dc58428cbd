r"""Loading the ``_C`` extension and choosing its CPU instruction path: the one module that imports ``_C``.

Importing never fails because of the native library: without ``_C`` every op runs
:mod:`diffusers_svdquant.reference` and says so once. ``_C`` takes ``data_ptr()``\ s and shapes,
never torch objects.

Environment:
    ``SVDQ_CPU_ISA``: force a CPU instruction path (``generic``; x86: ``avx2``, ``avxvnni``,
    ``avx512vnni``, ``avx512bf16``, ``amx``; Arm: ``dotprod``, ``i8mm``) at import; an unknown or unsupported
    name is ignored with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .. import reference

try:
    from .. import _C  # type: ignore[attr-defined]

    _NATIVE_ERROR: Exception | None = None
    if _C.GROUP_SIZE != reference.GROUP_SIZE:  # a stale build: its kernels would read the wrong groups
        raise ImportError(f"_C was built for group size {_C.GROUP_SIZE}, reference.py uses {reference.GROUP_SIZE}")
except (ImportError, AttributeError) as e:  # importing the package never fails because of the native library
    _C = None
    _NATIVE_ERROR = e

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_fallback(op: str) -> None:
    """Say once per op that it runs ``reference.py`` because ``_C`` is missing."""
    warn_once(op, f"{op}: diffusers_svdquant._C unavailable ({_NATIVE_ERROR}); using reference.py")


def native_available() -> bool:
    """True when the ``_C`` extension was built and imported."""
    return _C is not None


def native_error() -> Exception | None:
    """Why ``_C`` failed to import, or None."""
    return _NATIVE_ERROR


def supported_cpu_isas() -> list[str]:
    """CPU instruction paths this machine can run, ``"generic"`` first (``[]`` without ``_C``)."""
    return list(_C.supported_cpu_isas()) if _C is not None else []


def known_cpu_isas() -> list[str]:
    """CPU instruction paths compiled into ``_C`` (``[]`` without it), runnable here or not."""
    return list(_C.known_cpu_isas()) if _C is not None else []


def cpu_isa() -> str | None:
    """The CPU instruction path in use, or None without ``_C``."""
    return _C.cpu_isa() if _C is not None else None


def set_cpu_isa(name: str) -> None:
    """Select a CPU instruction path; ``ValueError`` if this CPU cannot run it."""
    if _C is None:
        raise RuntimeError(f"diffusers_svdquant._C is not available: {_NATIVE_ERROR}")
    _C.set_cpu_isa(name)


def apply_env(var: str, setter: Callable[[str], None]) -> None:
    """Call ``setter`` with the environment variable ``var`` when it is set (at import, to force a kernel path);
    a value the setter refuses with ``ValueError`` is ignored with a warning that names the variable."""
    value = os.environ.get(var)
    if value:
        try:
            setter(value)
        except ValueError as e:
            warnings.warn(f"{var} ignored: {e}", RuntimeWarning, stacklevel=2)


if _C is not None:
    apply_env("SVDQ_CPU_ISA", set_cpu_isa)


def in_one_dtype(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Contiguous, in one dtype the kernel reads: their common one, else float32 (which holds each of
    bfloat16 / float16 / float32 exactly, so the result does not change)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in DTYPE_CODES else torch.float32
    if all(t is None or (t.dtype == dtype and t.is_contiguous()) for t in tensors):
        return list(tensors)  # the common case, without 2 calls per tensor (~1 us each, per layer call)
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def int8_peak_gops(num_threads: int | None = None) -> float:
    """GOP/s of a tight loop of the selected CPU path's int8 instruction (``vpdpbusd`` on the VNNI
    paths, ``vpmaddubsw`` + ``vpmaddwd`` otherwise; on Arm ``smmla`` on the i8mm path, ``sdot`` otherwise):
    the peak the benchmarks compare the GEMM against (2 ops per product). ``num_threads`` defaults to
    ``torch.get_num_threads()``; 0.0 without AVX2 or the Arm dot product.
    """
    if _C is None or not {"avx2", "dotprod"} & set(_C.supported_cpu_isas()):
        return 0.0
    return _C.int8_peak_gops(torch.get_num_threads() if num_threads is None else num_threads)


def first_nonfinite(tensors: list[torch.Tensor]) -> int:
    """Index of the first tensor holding NaN or ±inf, or -1 when every one is finite.

    ``tensors``: floating-point tensors of any shape (float32, bfloat16 or float16 on the CPU take the
    native scan of their raw bits, one pass at memory speed over all threads; anything else, e.g. CUDA or
    strided tensors, takes one fused torch norm, followed by a per-tensor check only when it is not finite).
    """
    native = [
        i
        for i, t in enumerate(tensors)
        if _C is not None and t.device.type == "cpu" and t.dtype in DTYPE_CODES and t.is_contiguous()
    ]
    bad = []
    if native:
        picked = [tensors[i] for i in native]
        hit = _C.first_nonfinite(
            [t.data_ptr() for t in picked], [t.numel() for t in picked], [DTYPE_CODES[t.dtype] for t in picked],
            torch.get_num_threads(),
        )  # fmt: skip
        bad += [native[hit]] if hit >= 0 else []
    rest = sorted(set(range(len(tensors))) - set(native))
    # NaN and infinity propagate into a norm; a finite 16-bit tensor can only overflow it, which the exact
    # per-tensor check then clears.
    if rest and not torch.isfinite(torch.nn.utils.get_total_norm([tensors[i] for i in rest])):
        bad += [i for i in rest if not torch.isfinite(tensors[i]).all()][:1]
    return min(bad, default=-1)


class FiniteScan:
    """:func:`first_nonfinite` over byte ranges of a file (e.g. a checkpoint's tensors), read and tested on a
    native background thread (``_C.FiniteScanner``) from construction on, so that a loader's integrity check
    overlaps its loading instead of adding to it. The thread reads the file into a small buffer rather than
    through a memory mapping, whose page faults would contend with the loader's own.

    Args:
        path: the file.
        ranges: ``(byte offset, numel, dtype)`` per tensor in the file: float32, bfloat16 or float16, the
            offset a multiple of the dtype's size.

    Raises ``ValueError`` naming the file or the range when the file cannot be opened or a range is not an
    aligned part of it. Without ``_C`` the scan runs in :meth:`finish` instead, through torch.
    """

    def __init__(self, path: str | os.PathLike, ranges: list[tuple[int, int, torch.dtype]]) -> None:
        try:
            codes = [DTYPE_CODES[d] for _, _, d in ranges]
        except KeyError as e:
            i = next(i for i, (_, _, d) in enumerate(ranges) if d not in DTYPE_CODES)
            raise ValueError(
                f"FiniteScan: range {i} has dtype {e.args[0]}; expected float32, bfloat16 or float16"
            ) from None
        self._path, self._ranges = os.fspath(path), ranges
        self._bad: list[int] | None = None
        self._scanner = None
        if _C is not None:
            self._scanner = _C.FiniteScanner(self._path, [o for o, _, _ in ranges], [n for _, n, _ in ranges], codes)
            return
        try:
            size = os.path.getsize(self._path)
        except OSError as e:
            raise ValueError(f"FiniteScanner: cannot open {self._path}") from e
        for i, (o, n, d) in enumerate(ranges):
            if o < 0 or n < 0 or o % d.itemsize or o + n * d.itemsize > size:
                raise ValueError(f"FiniteScanner: range {i} ({n} elements of {d.itemsize} bytes at byte {o}) is not "
                                 f"an aligned part of {self._path} ({size} bytes)")  # fmt: skip

    def finish(self) -> list[int]:
        """Wait for the scan; the indices of the ranges holding NaN or ±inf, ascending."""
        if self._bad is None:
            if self._scanner is not None:
                self._bad = list(self._scanner.finish())
            else:
                self._bad = []
                with open(self._path, "rb") as f:
                    for i, (o, n, d) in enumerate(self._ranges):
                        f.seek(o)
                        data = bytearray(f.read(n * d.itemsize))
                        if n and not torch.isfinite(torch.frombuffer(data, dtype=d)).all():
                            self._bad.append(i)
        return self._bad
