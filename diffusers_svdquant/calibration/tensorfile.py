"""Write a safetensors file one tensor at a time, so a statistics file of many ``K x K`` sums is written while
holding one of them, not all (``safetensors.torch.save_file`` needs every tensor in memory at once)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping

import torch

# safetensors' dtype names for the dtypes a statistics file holds.
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
}


def write_tensors(
    path: str,
    shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    read: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Write the safetensors file ``path`` holding tensor ``name`` = ``read(name)`` for each name of ``shapes``.

    Args:
        path: the file to create (overwritten).
        shapes: name → ``(dtype, shape)`` of what ``read(name)`` returns, known before any is read (the header
            comes first). Tensors are laid out in the name order.
        read: returns one tensor (CPU, the announced dtype and shape); called once per name, in name order, and
            its result dropped before the next, so peak memory is one tensor.
        metadata: the file's string → string metadata.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(shapes)
    for name in names:
        dtype, shape = shapes[name]
        if dtype not in _DTYPES:
            raise ValueError(f"write_tensors: tensor {name!r} has dtype {dtype}, not one a statistics file holds")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes so the data stays aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            dtype, shape = shapes[name]
            t = read(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"write_tensors: tensor {name!r} is {t.dtype} {list(t.shape)}, announced {dtype} {list(shape)}"
                )
            # Little-endian bytes as safetensors stores them (every supported host is little-endian), written from
            # the tensor's own buffer: no second copy.
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
