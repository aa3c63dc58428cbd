"""The quality report (``svdquant eval``): per-layer errors, the methods compared, the table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_svdquant import CalibrationStats, SVDQuantLinear
from diffusers_svdquant.apps import quality_report as quality


def test_layer_errors_equal_a_direct_computation():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(128, 64))
    q = nn.Sequential(SVDQuantLinear.from_linear(ref[0], 8))
    rows = torch.randn(16, 128)
    stats = CalibrationStats(samples={"0": rows})
    errs = quality.layer_errors(q, ref, stats)
    with torch.no_grad():
        want = ((q[0](rows) - ref[0](rows)).norm() / ref[0](rows).norm()).item()
    assert errs == {"0": pytest.approx(want, rel=1e-5)}
    assert 0 < want < 0.5


def test_methods_side_by_side():
    stats = CalibrationStats(act_absmax={"a": torch.ones(64)})
    methods = quality.method_configs(32, stats)
    adaln = ["svdquant-adaln-16bit", "svdquant-adaln-w4a4"]
    assert list(methods) == ["naive-w4a4", "smoothquant-w4a4", "svdquant", "svdquant-calibrated", *adaln]
    assert methods["naive-w4a4"].rank == 0 and methods["naive-w4a4"].calibration is None
    assert methods["smoothquant-w4a4"].rank == 0 and methods["smoothquant-w4a4"].smoothing_alpha == 0.5
    # The baselines round to nearest (absmax / 7); the SVDQuant rows take the default scale search.
    assert not methods["naive-w4a4"].scale_search and not methods["smoothquant-w4a4"].scale_search
    assert methods["svdquant"].scale_search and methods["svdquant-calibrated"].scale_search
    assert methods["svdquant"].calibration is None and methods["svdquant-calibrated"].calibration is stats
    # The AdaLN rows differ from svdquant-calibrated in the AdaLN linears' precision only.
    assert methods["svdquant-adaln-16bit"].is_excluded("transformer_blocks.0.norm1.linear")
    assert methods["svdquant-adaln-16bit"].calibration is stats and methods["svdquant-adaln-w4a4"].calibration is stats
    assert not methods["svdquant-adaln-w4a4"].is_weight_only("transformer_blocks.0.norm1.linear")
    assert methods["svdquant-calibrated"].is_weight_only("transformer_blocks.0.norm1.linear")
    assert list(quality.method_configs(32, None)) == ["naive-w4a4", "svdquant", *adaln]
    with_moments = CalibrationStats(act_absmax={"a": torch.ones(64)}, hessian={"a": torch.eye(64)})
    methods = quality.method_configs(32, with_moments)
    assert list(methods)[-4:-2] == ["svdquant-calibrated", "svdquant-calibrated-gptq"]
    assert methods["svdquant-calibrated"].gptq is False and methods["svdquant-calibrated-gptq"].gptq is True


def test_format_report_lists_worst_layers():
    r = quality.MethodReport("svdquant", 30.0, 0.9, 40.0, 0.01, {"a": 0.1, "b": 0.3, "c": 0.2})
    text = quality.format_report([r], worst=2)
    assert "svdquant" in text and "b 0.3000, c 0.2000" in text and "a 0.1000" not in text
    assert r.mean_layer_error == pytest.approx(0.2)
