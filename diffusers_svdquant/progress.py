"""Progress bars that follow diffusers' convention: ``diffusers.utils.logging.disable_progress_bar()``
turns every bar of this package off too, as it does diffusers' own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress_bar(
    items: Iterable[Any] | None = None, *, desc: str, total: int | None = None, enabled: bool = True
) -> Any:
    """A tqdm bar over ``items`` (or one to ``update()`` up to ``total``), off when ``enabled`` is False or
    diffusers' progress bars are disabled. It goes away when done (``leave=False``)."""
    from diffusers.utils.logging import is_progress_bar_enabled
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=not (enabled and is_progress_bar_enabled()), leave=False)
