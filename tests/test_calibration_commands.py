"""``svdquant calibrate / quantize / eval`` on a tiny FluxPipeline, on one process and on two cooperating ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline
from models import TINY_PIPELINE_KWARGS, build_pipeline

from diffusers_svdquant import CalibrationStats, SVDQuantLinear
from diffusers_svdquant.apps import cli

CALIB = ["--num-prompts", "4", "--steps", "2", "--rank", "16", "--pipeline-kwargs", json.dumps(TINY_PIPELINE_KWARGS)]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("cmd-pipe"))


def _same_statistics(a: CalibrationStats, b: CalibrationStats) -> None:
    assert set(a.act_absmax) == set(b.act_absmax) and a.act_absmax
    for k in a.act_absmax:
        assert torch.equal(a.act_absmax[k], b.act_absmax[k]), k
        assert torch.equal(a.samples[k], b.samples[k]), k
        assert torch.equal(a.sample_keys[k], b.sample_keys[k]), k
    assert a.num_tokens == b.num_tokens
    assert a.smoothing == b.smoothing
    for k in a.search_errors:
        assert torch.equal(a.search_errors[k], b.search_errors[k]), k
    assert a.has_hessian == b.has_hessian
    for k in a.act_absmax if a.has_hessian else ():
        assert torch.equal(a.hessian_for(k), b.hessian_for(k)), k


def _launch(launcher: list[str], args: list[str], tmp_path) -> subprocess.CompletedProcess:
    # One thread per process in both runs: torch's CPU kernels may round differently with the thread count,
    # and two 2-thread processes on 2 cores would only fight.
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, "-m", "diffusers_svdquant.apps.cli", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


LAUNCHERS = {
    # The documented command: --multi_gpu makes accelerate start N processes even without a GPU
    # (plain --num_processes 2 on a CPU-only machine starts one).
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", _free_port()],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
}  # fmt: skip


@pytest.fixture(scope="module")
def one_process(pipe_dir, tmp_path_factory):
    """The statistics file of a single-process `python -m diffusers_svdquant.apps.cli calibrate` run."""
    tmp = tmp_path_factory.mktemp("one")
    _launch([sys.executable], [*_calibrate_args(pipe_dir), "--out", str(tmp / "one.safetensors")], tmp)
    return tmp / "one.safetensors"


def _calibrate_args(pipe_dir) -> list[str]:
    return ["calibrate", str(pipe_dir), *CALIB, "--include-samples", "--gptq"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_give_the_statistics_of_one(pipe_dir, one_process, tmp_path, launcher):
    """Two launched processes join one group (the file records world size 2) and produce exactly the
    statistics, samples, XᵀX (for GPTQ) and searched (α, β) of a single process, the XᵀX gathered in 3 passes
    (rank 0 merging each pass's sums into a shard) against one pass, the sums of layers reading one tensor shared."""
    one, two = one_process, tmp_path / "two.safetensors"
    args = [*_calibrate_args(pipe_dir), "--hessian-passes", "3", "--out", str(two)]
    out = _launch(LAUNCHERS[launcher](), args, tmp_path)
    assert "on 2 process(es)" in out.stdout
    a, b = CalibrationStats.load(one), CalibrationStats.load(two)
    assert a.info["num_processes"] == 1 and b.info["num_processes"] == 2
    assert a.info["hessian_passes"] == 1 and b.info["hessian_passes"] == 3
    _same_statistics(a, b)
    assert len(a.smoothing) == len(a.act_absmax) - 3 and a.has_hessian  # the 3 AdaLN linears: W4A16, not searched
    # q / k / v (and the single block's proj_mlp) read one tensor: their XᵀX is held and stored once, alike.
    assert a.hessian_alias == b.hessian_alias and len(a.hessian_alias) == 2 + 2 + 3


@pytest.mark.slow
def test_fixed_point_sums_on_two_processes_give_the_bits_of_one(pipe_dir, one_process, tmp_path):
    """--hessian-sum fixed with several prompts per process: 2 processes x 2 passes give the statistics and XᵀX bits
    of 1 process x 1 pass, within float32 rounding of the summation tree's."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    args = [*_calibrate_args(pipe_dir), "--hessian-sum", "fixed"]
    _launch([sys.executable], [*args, "--out", str(one)], tmp_path)
    _launch(LAUNCHERS["torchrun"](), [*args, "--hessian-passes", "2", "--out", str(two)], tmp_path)
    a, b, tree = CalibrationStats.load(one), CalibrationStats.load(two), CalibrationStats.load(one_process)
    assert a.info["hessian_sum"] == b.info["hessian_sum"] == "fixed" and tree.info["hessian_sum"] == "tree"
    assert b.info["num_processes"] == 2 and b.info["hessian_passes"] == 2
    _same_statistics(a, b)
    assert a.hessian_names() == tree.hessian_names() and a.hessian_alias == tree.hessian_alias
    for name in tree.hessian_names():
        want = tree.hessian_for(name)
        torch.testing.assert_close(a.hessian_for(name), want, rtol=1e-5, atol=1e-6 * want.diagonal().max())


@pytest.mark.slow
@pytest.mark.parametrize("hessian_sum", ["tree", "fixed"])
def test_hessian_prompts_on_two_processes_give_the_bits_of_one(pipe_dir, tmp_path, hessian_sum):
    """--hessian-prompts 3 of 4 (prompts 0, 1, 2: two on rank 0, one on rank 1): 2 processes x 2 passes (the second
    running those prompts alone) give the statistics and XᵀX bits of 1 process x 1 pass, in either sum; in fixed
    point with --hessian-rows-per-column 2 too (a share of the calls, the same ones on every split)."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    args = [*_calibrate_args(pipe_dir), "--hessian-prompts", "3", "--hessian-sum", hessian_sum]
    args += ["--hessian-rows-per-column", "2"] if hessian_sum == "fixed" else []
    _launch([sys.executable], [*args, "--out", str(one)], tmp_path)
    out = _launch(LAUNCHERS["torchrun"](), [*args, "--hessian-passes", "2", "--out", str(two)], tmp_path)
    assert f"XᵀX over 3 prompts, summed by {hessian_sum} in 2 pass(es)" in out.stdout
    a, b = CalibrationStats.load(one), CalibrationStats.load(two)
    assert a.info["hessian_prompts"] == b.info["hessian_prompts"] == 3 and b.info["num_processes"] == 2
    _same_statistics(a, b)
    assert a.hessian_rows == b.hessian_rows
    if hessian_sum == "fixed":  # calls were dropped: fewer rows than 3 of the 4 prompts' tokens
        assert b.info["hessian_rows_per_column"] == 2 and "calls kept for about 2 rows" in out.stdout
        assert any(4 * a.hessian_rows[n] < 3 * a.num_tokens[n] for n in a.hessian_rows)


def test_the_summary_says_how_xtx_was_summed():
    """The calibrate command's one-line summary: the XᵀX prompts, sum, passes, whether each call was added at once
    (a model on a GPU), and how many layers were recorded again."""
    from diffusers_svdquant.apps.calibration_commands import _summary

    stats = CalibrationStats(info={"hessian_sum": "fixed", "hessian_passes": 2, "hessian_prompts": 8})
    line = _summary(stats, 1.0)
    assert line.endswith("; XᵀX over 8 prompts, summed by fixed in 2 pass(es)")
    stats.info |= {"hessian_per_call": True, "hessian_retried": ["a", "b"]}
    assert _summary(stats, 1.0).endswith(
        "summed by fixed in 2 pass(es), each call added at once, 2 layer(s) recorded again in units from the statistics"
    )


def test_calibrate_command_writes_a_file_the_quantizer_reads(pipe_dir, tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    assert cli.main(["calibrate", str(pipe_dir), *CALIB, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # 20 layers: 17 W4A4 searched, the 3 AdaLN linears W4A16 (statistics only: they take α = 0.5).
    assert "calibrated 20 layers over 4 prompts x 2 steps on 1 process(es)" in printed
    stats = CalibrationStats.load(out)
    assert stats.samples == {}  # not asked for
    assert stats.info["prompts"] == 4 and stats.info["search_rank"] == 16
    assert len(stats.smoothing) == 17


def test_calibrate_command_reads_a_prompt_file(pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n  a blue house  \n")
    out = tmp_path / "s.safetensors"
    args = ["calibrate", str(pipe_dir), "--prompts", str(prompts), "--steps", "1", "--no-search", "--out", str(out)]
    assert cli.main([*args, "--pipeline-kwargs", json.dumps(TINY_PIPELINE_KWARGS)]) == 0
    assert CalibrationStats.load(out).info["prompts"] == 2
    with pytest.raises(SystemExit, match="missing.txt"):
        cli.main(["calibrate", str(pipe_dir), "--prompts", str(tmp_path / "missing.txt"), "--out", str(out)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--hessian-passes", "2"], "--hessian-passes needs --gptq"),
        (["--hessian-sum", "fixed"], "--hessian-sum needs --gptq"),
        (["--hessian-prompts", "2"], "--hessian-prompts needs --gptq"),
        (["--hessian-rows-per-column", "all"], "--hessian-rows-per-column needs --gptq"),
        (["--gptq", "--hessian-rows-per-column", "0"], "2"),  # argparse: usage error, exit status 2
        (["--gptq", "--hessian-rows-per-column", "x"], "2"),
        (["--gptq", "--hessian-sum", "tree", "--hessian-rows-per-column", "8"], "needs fixed-point sums"),
        (["--gptq", "--hessian-prompts", "0"], "--hessian-prompts must be >= 1"),
        (["--gptq", "--hessian-passes", "0"], "--hessian-passes must be >= 1"),
        (["--gptq", "--hessian-budget-gib", "-1"], "--hessian-budget-gib must be > 0"),
        (["--gptq", "--hessian-budget-gib", "1e-6"], "svdquant: calibrate: layer .* alone needs .* GiB of XᵀX sums"),
    ],
)
def test_calibrate_command_refuses_bad_pass_options(pipe_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["calibrate", str(pipe_dir), *CALIB, *extra, "--out", str(tmp_path / "s.safetensors")])


def test_quantize_one_shot_calibrates_quantizes_and_saves(pipe_dir, tmp_path, capsys):
    """`svdquant quantize --calibrate` writes a whole pipeline whose transformer reloads quantized,
    with the searched smoothing in it, and a model card; an existing --out is kept without --overwrite."""
    out = tmp_path / "q"
    assert cli.main(["quantize", str(pipe_dir), *CALIB, "--calibrate", "--out", str(out)]) == 0
    assert "quantized" in capsys.readouterr().out
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["rank"] == 16
    pipe = FluxPipeline.from_pretrained(out)
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, SVDQuantLinear) and not torch.all(to_q.smooth == 1)
    images = pipe("a cat", num_inference_steps=1, output_type="pt", **TINY_PIPELINE_KWARGS).images
    assert torch.isfinite(images).all()

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit, match="--overwrite"):
        cli.main(["quantize", str(pipe_dir), "--rank", "8", "--out", str(out)])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert cli.main(["quantize", str(pipe_dir), "--rank", "8", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]["rank"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary or backup folder left behind


def test_quantize_a_single_model_with_a_statistics_file(pipe_dir, tmp_path):
    stats = tmp_path / "stats.safetensors"
    assert cli.main(["calibrate", str(pipe_dir), *CALIB, "--out", str(stats)]) == 0
    out = tmp_path / "t"
    assert cli.main(["quantize", str(pipe_dir / "transformer"), "--calibration", str(stats), "--rank", "16",
                     "--out", str(out)]) == 0  # fmt: skip
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(out)
    assert not torch.all(model.transformer_blocks[0].attn.to_q.smooth == 1)
    with pytest.raises(SystemExit, match="needs a pipeline"):
        cli.main(["quantize", str(pipe_dir / "transformer"), "--calibrate", "--out", str(tmp_path / "t2")])


def test_eval_prints_every_method(pipe_dir, tmp_path, capsys):
    """`svdquant eval` compares the four methods with the 16-bit pipeline on the same seeds: image
    PSNR / SSIM, latent PSNR / error and per-layer errors, as a table and as JSON."""
    report = tmp_path / "report.json"
    args = ["eval", str(pipe_dir), *CALIB, "--num-eval-prompts", "2", "--eval-steps", "2", "--json", str(report)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    methods = ["naive-w4a4", "smoothquant-w4a4", "svdquant", "svdquant-calibrated", "svdquant-adaln-16bit",
               "svdquant-adaln-w4a4"]  # fmt: skip
    for m in methods:
        assert m in out
    rows = json.loads(report.read_text())
    assert [r["name"] for r in rows] == methods
    for r in rows:
        assert 0 < r["image_ssim"] <= 1 and r["image_psnr"] > 10 and r["latent_rel_error"] < 1
        layers = 17 if r["name"] == "svdquant-adaln-16bit" else 20  # the 3 AdaLN linears quantized or not
        assert len(r["layer_errors"]) == layers and all(0 <= e < 1 for e in r["layer_errors"].values())
        # The tiny FLUX's blocks (1 double, 1 single) on the evaluation prompts' inputs.
        assert sorted(r["block_errors"]) == ["single_transformer_blocks.0", "transformer_blocks.0"], r
        assert all(0 < e < 1 for e in r["block_errors"].values()), r
    block = {r["name"]: sum(r["block_errors"].values()) for r in rows}
    assert block["svdquant-calibrated"] < block["svdquant"] < block["naive-w4a4"], block
