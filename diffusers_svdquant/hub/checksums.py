"""Per-tensor checksums of a saved checkpoint, written beside it at save time and compared on request.

``save_pretrained`` writes safetensors files that carry no checksum, and a flipped bit in a weights file
loads without a word. :func:`write_checksums` (run by :func:`~diffusers_svdquant.hub.save_quantized`, so by
``svdquant quantize`` and ``svdquant push``) records the CRC-32 of every tensor's bytes in
``svdquant_checksums.json``; :func:`verify_checksums` (``svdquant inspect --verify``, ``hub.load(verify=True)``)
reads every tensor again and names each one that differs. The check reads the whole checkpoint, so it is
opt-in; the cheap check that always runs at load is the finiteness of each quantized layer's tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

from ..filemodes import as_new_files

CHECKSUM_FILE = "svdquant_checksums.json"
_FORMAT = "svdquant-checksums"


def _crc32(tensor) -> str:
    """CRC-32 of a tensor's bytes as stored (row-major, its own dtype), 8 hex digits."""
    import torch

    data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(memoryview(data)):08x}"


def tensor_checksums(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``{safetensors file relative to folder: {tensor name: crc32}}`` of every weights file under ``folder``."""
    from safetensors import safe_open

    root = Path(folder)
    out: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out[path.relative_to(root).as_posix()] = {k: _crc32(f.get_tensor(k)) for k in sorted(f.keys())}
    return out


def write_checksums(folder: str | os.PathLike) -> Path:
    """Record the checksums of the safetensors files under ``folder`` in ``folder/svdquant_checksums.json``
    (written beside it and renamed over it, so a failed write leaves the previous file)."""
    root = Path(folder)
    payload = {"format": _FORMAT, "version": 1, "files": tensor_checksums(root)}
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        as_new_files([tmp])
        os.replace(tmp, root / CHECKSUM_FILE)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return root / CHECKSUM_FILE


def verify_checksums(folder: str | os.PathLike) -> list[str]:
    """Compare the safetensors files under ``folder`` with the checksums recorded at save time.

    Returns:
        One line per problem (a changed, missing or extra tensor or file), empty when everything matches.

    Raises:
        FileNotFoundError: ``folder`` has no ``svdquant_checksums.json`` (saved by plain ``save_pretrained``).
        ValueError: the file is not a checksum file.
    """
    root = Path(folder)
    path = root / CHECKSUM_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{os.fspath(root)!r} has no {CHECKSUM_FILE}: only checkpoints saved by hub.save_quantized "
            f"(svdquant quantize / push) carry checksums"
        )
    recorded = json.loads(path.read_text())
    if not isinstance(recorded, dict) or recorded.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {CHECKSUM_FILE} written by diffusers-svdquant")
    want, got = recorded.get("files", {}), tensor_checksums(root)
    problems = [f"{f}: file missing" for f in sorted(set(want) - set(got))]
    problems += [f"{f}: file not in {CHECKSUM_FILE}" for f in sorted(set(got) - set(want))]
    for f in sorted(set(want) & set(got)):
        for name in sorted(set(want[f]) | set(got[f])):
            if name not in got[f]:
                problems.append(f"{f}: tensor {name!r} missing")
            elif name not in want[f]:
                problems.append(f"{f}: tensor {name!r} was not saved with this checkpoint")
            elif want[f][name] != got[f][name]:
                problems.append(f"{f}: tensor {name!r} changed (crc32 {got[f][name]}, saved {want[f][name]})")
    return problems
