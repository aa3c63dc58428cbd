"""The one parser of dtype names: what ``--dtype``, ``torch_dtype`` in ``config.json`` and the hub helpers accept."""

from __future__ import annotations

import torch

# The short names the command line offers, in the order help texts list them.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BY_NAME = {**DTYPES, **{str(d).removeprefix("torch."): d for d in DTYPES.values()}}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A floating dtype from ``torch.bfloat16``, ``"bf16"``, ``"bfloat16"`` or ``"torch.bfloat16"``.

    Raises:
        ValueError: any other name (the message lists the accepted ones).
    """
    if isinstance(name, torch.dtype):
        return name
    dtype = _BY_NAME.get(str(name).removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(_BY_NAME)}")
    return dtype
