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


def _plant_outliers(transformer: nn.Module, factor: float = 30.0) -> None:
    """Scale 4 random output channels of the layers that feed to_out / ff.net.2 / proj_out: their inputs then have
    outlier channels, as real diffusion activations do."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            feeders = [blk.attn.to_v]
            feeders += [blk.ff.net[0].proj, blk.ff_context.net[0].proj, blk.attn.add_v_proj] if hasattr(blk, "ff") \
                else [blk.proj_mlp]  # fmt: skip
            for lin in feeders:
                rows = torch.randperm(lin.out_features, generator=g)[:4]
                lin.weight[rows] *= factor
                lin.bias[rows] *= factor


@pytest.fixture
def one_thread():
    """Small SVDs on 2 threads of a shared 2-core machine spin in OpenMP (128 x 512: 2 s against 5 ms on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_latent_psnr_orders_the_methods_on_planted_outliers(tmp_path, one_thread):
    """The tiny FluxPipeline with planted outlier channels, through the eval's methods: latent PSNR of calibrated +
    GPTQ > calibrated > uncalibrated SVDQuant. Measured (8 calibration prompts x 2 steps, 4 eval prompts, rank 16):
    55.97 / 62.71 / 65.42 dB (naive W4A4 53.91, SmoothQuant 58.60); here 4 x 2 and 2 prompts."""
    import copy

    from diffusers import FluxPipeline
    from models import TINY_PIPELINE_KWARGS, build_pipeline

    from diffusers_svdquant import calibrate, quantize_
    from diffusers_svdquant.calibration.prompts import CALIBRATION_PROMPTS, EVAL_PROMPTS

    pipe = FluxPipeline.from_pretrained(build_pipeline(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    _plant_outliers(pipe.transformer)
    call = {"num_inference_steps": 2, **TINY_PIPELINE_KWARGS}
    stats = calibrate(pipe, prompts=CALIBRATION_PROMPTS[:4], config=quality.SVDQuantConfig(rank=16), hessian=True,
                      progress=False, pipeline_kwargs=TINY_PIPELINE_KWARGS, num_inference_steps=2)  # fmt: skip
    reference = pipe.transformer
    ref_images, ref_latents = quality.generate(pipe, EVAL_PROMPTS[:2], 0, **call)
    methods = quality.method_configs(16, stats)
    psnr = {}
    for name in ("svdquant", "svdquant-calibrated", "svdquant-calibrated-gptq"):
        pipe.transformer = quantize_(copy.deepcopy(reference), methods[name])
        images, latents = quality.generate(pipe, EVAL_PROMPTS[:2], 0, **call)
        psnr[name] = quality.compare(name, images, latents, ref_images, ref_latents).latent_psnr
    assert psnr["svdquant-calibrated-gptq"] > psnr["svdquant-calibrated"] > psnr["svdquant"], psnr
