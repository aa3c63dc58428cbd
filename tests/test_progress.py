"""Progress bars over layers follow diffusers' switch (diffusers.utils.logging.disable_progress_bar)."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from models import TINY_MODELS

from diffusers_svdquant import SVDQuantConfig
from diffusers_svdquant.progress import progress_bar


@pytest.fixture
def bars_on():
    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.enable_progress_bar()
    yield
    if not enabled:
        diffusers_logging.disable_progress_bar()


def test_quantize_on_load_shows_a_bar_over_layers_unless_diffusers_disables_bars(tmp_path, capsys, bars_on):
    tiny = TINY_MODELS["flux"]
    torch.manual_seed(0)
    tiny.build().save_pretrained(tmp_path)
    load = lambda: tiny.cls.from_pretrained(tmp_path, quantization_config=SVDQuantConfig(rank=8))  # noqa: E731
    load()
    assert "svdquant: quantizing FluxTransformer2DModel" in capsys.readouterr().err
    diffusers_logging.disable_progress_bar()
    load()
    assert "svdquant: quantizing" not in capsys.readouterr().err


def test_progress_bar_switches(bars_on):
    assert not progress_bar(range(3), desc="x", enabled=True).disable
    assert progress_bar(range(3), desc="x", enabled=False).disable
    diffusers_logging.disable_progress_bar()
    assert progress_bar(total=3, desc="x").disable
