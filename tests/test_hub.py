"""Hub workflow against a real Hub-compatible HTTP server (tests/hub_server.py) on 127.0.0.1.

Every push and pull goes through huggingface_hub's real client (create_repo, preupload, LFS batch + PUT,
ndjson commit, repo info, tree listing, resolve with redirects to the storage origin) and diffusers'
``from_pretrained``. The client reads its endpoint from module constants set at import time, so the ``hub``
fixture points those at the server (what ``HF_ENDPOINT`` does in a fresh process) and disables Xet (the server
speaks plain LFS).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import FluxTransformer2DModel
from hub_server import HubServer
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from models import TINY_MODELS, run

import diffusers_svdquant
from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear, W4A16Linear, hub
from diffusers_svdquant.apps import cli

TOKEN = "hf_alice_write"
BOB = "hf_bob_write"
FLUX = TINY_MODELS["flux"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(monkeypatch):
    srv = HubServer({TOKEN: "alice", BOB: "bob"}).start()
    url = srv.url
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # huggingface_hub's module-level functions (model_info, used by diffusers for sharded checkpoints) are bound to
    # an HfApi created at import.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def flux16(tmp_path_factory) -> Path:
    """A tiny random FLUX transformer saved in bf16 (the '16-bit model repo')."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("flux16")
    FLUX.build().to(torch.bfloat16).save_pretrained(path)
    return path


def _quantize(path: Path, rank: int = 16) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(
        path, quantization_config=SVDQuantConfig(rank=rank), torch_dtype=torch.bfloat16
    ).eval()


@pytest.fixture(scope="module")
def fluxq(flux16) -> FluxTransformer2DModel:
    return _quantize(flux16)


def _out(model) -> torch.Tensor:
    return run(model, FLUX.inputs(torch.bfloat16))


def _saved(model, tmp_path: Path, repo_id: str, **kwargs) -> Path:
    return hub.save_quantized(model, tmp_path / f"save-{repo_id.replace('/', '-')}-{time.monotonic_ns()}",
                              repo_id=repo_id, base_model="acme/tiny-flux", **kwargs)  # fmt: skip


def _lfs_puts(server: HubServer) -> int:
    return sum(1 for method, path in server.requests if method == "PUT" and path.startswith("/upload/"))


def test_round_trip_bit_identical_from_an_empty_cache(server, fluxq, tmp_path):
    expected = _out(fluxq)
    folder = _saved(fluxq, tmp_path, "alice/tiny-flux-svdq")
    result = hub.push(folder, "alice/tiny-flux-svdq", token=TOKEN)

    repo = server.repos["alice/tiny-flux-svdq"]
    assert len(repo.commits) == 2  # create_repo's initial commit + exactly one upload commit
    assert result.commit_id == server.head("alice/tiny-flux-svdq") and result.parent_commit in repo.commits
    assert _lfs_puts(server) == 1  # the weights went through LFS batch + PUT to the storage origin
    assert repo.commits[result.commit_id].tree["diffusion_pytorch_model.safetensors"].lfs_sha256 is not None
    weights = "diffusion_pytorch_model.safetensors"
    assert server.files("alice/tiny-flux-svdq")[weights] == (folder / weights).read_bytes()

    cache = tmp_path / "cache"
    snapshot = hub.pull("alice/tiny-flux-svdq", cache_dir=cache)
    assert snapshot.is_relative_to(cache) and (snapshot / "config.json").is_file()
    reloaded = FluxTransformer2DModel.from_pretrained("alice/tiny-flux-svdq", cache_dir=cache).eval()
    assert isinstance(reloaded.transformer_blocks[0].attn.to_q, SVDQuantLinear)
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(_out(reloaded), expected)
    # A pull from a second, empty cache through hub.load gives the same model.
    assert torch.equal(_out(hub.load("alice/tiny-flux-svdq", cache_dir=tmp_path / "cache2")), expected)


def test_model_card_metadata_parses(server, fluxq, tmp_path):
    folder = _saved(fluxq, tmp_path, "alice/carded", quality={"relative error vs bf16": 0.0123})
    hub.push(folder, "alice/carded", token=TOKEN)
    card = ModelCard.load(hub.pull("alice/carded", cache_dir=tmp_path / "c") / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "acme/tiny-flux"
    assert meta["library_name"] == "diffusers"
    assert {"svdquant", "4-bit"} <= set(meta["tags"])
    q = meta["svdquant"]
    assert q["config"]["rank"] == 16 and q["config"]["quant_method"] == "svdquant"
    assert q["config"]["torch_dtype"] == "bfloat16" and q["config"]["format_version"] == 3
    dense, quant = hub.weight_sizes(fluxq)
    assert q["bytes_16bit"] == dense and q["bytes_quantized"] == quant and quant < dense
    assert q["checkpoint_bytes"] == (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    assert q["quality"] == {"relative error vs bf16": 0.0123}
    assert q["quantized_layers"] == sum(isinstance(m, SVDQuantLinear) for m in fluxq.modules())
    # The AdaLN linears are weight-only: counted, tagged and named in the card.
    assert q["weight_only_layers"] == sum(isinstance(m, W4A16Linear) for m in fluxq.modules()) > 0
    assert "w4a16" in meta["tags"] and f"{q['weight_only_layers']} weight-only W4A16" in card.text
    snippet = hub.load_snippet("alice/carded", "FluxTransformer2DModel")
    assert f"```python\n{snippet}\n```" in card.text
    # The snippet is the exact code that loads it.
    namespace: dict = {}
    exec(snippet.replace('"alice/carded")', f'"alice/carded", cache_dir={str(tmp_path / "c")!r})'), namespace)
    assert torch.equal(_out(namespace["model"]), _out(fluxq))


def test_revisions_by_commit_id_and_branch(server, flux16, fluxq, tmp_path):
    first = hub.push(_saved(fluxq, tmp_path, "alice/rev"), "alice/rev", token=TOKEN)
    q8 = _quantize(flux16, rank=8)  # same model re-quantized: not "a different model"
    second = hub.push(_saved(q8, tmp_path, "alice/rev"), "alice/rev", token=TOKEN)
    branch = hub.push(_saved(fluxq, tmp_path, "alice/rev"), "alice/rev", token=TOKEN, revision="r16")
    assert first.commit_id != second.commit_id and server.head("alice/rev") == second.commit_id
    assert server.head("alice/rev", "r16") == branch.commit_id and branch.parent_commit == second.commit_id

    cache = tmp_path / "cache"
    at_first = hub.load("alice/rev", revision=first.commit_id, cache_dir=cache)
    at_main = hub.load("alice/rev", cache_dir=cache)
    at_branch = hub.load("alice/rev", revision="r16", cache_dir=cache)
    assert at_first.config.quantization_config.rank == 16 and at_main.config.quantization_config.rank == 8
    assert torch.equal(_out(at_first), _out(fluxq)) and torch.equal(_out(at_branch), _out(fluxq))
    assert torch.equal(_out(at_main), _out(q8))
    with pytest.raises(hub.HubRepoNotFoundError, match="alice/rev"):
        hub.pull("alice/rev", revision="no-such-branch", cache_dir=cache)


def test_sharded_checkpoint_and_offline_mode(server, fluxq, tmp_path, monkeypatch):
    folder = _saved(fluxq, tmp_path, "alice/sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    hub.push(folder, "alice/sharded", token=TOKEN)
    assert _lfs_puts(server) == len(shards)
    hub.push(_saved(fluxq, tmp_path, "alice/single"), "alice/single", token=TOKEN)

    cache = tmp_path / "cache"
    hub.pull("alice/sharded", cache_dir=cache)
    hub.pull("alice/single", cache_dir=cache)
    server.stop()  # the network is gone
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expected = _out(fluxq)
    single = FluxTransformer2DModel.from_pretrained("alice/single", cache_dir=cache).eval()
    assert torch.equal(_out(single), expected)
    # diffusers 0.42 lists a sharded repo's files on the Hub unless local_files_only=True, even when offline;
    # hub.load passes it under HF_HUB_OFFLINE.
    sharded = FluxTransformer2DModel.from_pretrained("alice/sharded", cache_dir=cache, local_files_only=True)
    assert torch.equal(_out(sharded.eval()), expected)
    assert torch.equal(_out(hub.load("alice/sharded", cache_dir=cache)), expected)
    with pytest.raises(hub.HubError, match="alice/other"):
        hub.pull("alice/other", cache_dir=cache)


def test_subfolder_and_stale_files_of_a_previous_upload_are_removed(server, fluxq, tmp_path):
    sharded = _saved(fluxq, tmp_path, "alice/pipe-style", subfolder="transformer", max_shard_size="200KB")
    hub.push(sharded, "alice/pipe-style", token=TOKEN)
    assert any(p.startswith("transformer/") and "-of-" in p for p in server.files("alice/pipe-style"))
    single = _saved(fluxq, tmp_path, "alice/pipe-style", subfolder="transformer")
    result = hub.push(single, "alice/pipe-style", token=TOKEN)
    # One file now, and no stale shards or shard index next to it (diffusers would prefer the index).
    assert sorted(server.files("alice/pipe-style")) == [
        ".gitattributes", "README.md", "svdquant_checksums.json", "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert len(result.deleted) >= 4
    card = ModelCard.load(single / "README.md")
    assert 'subfolder="transformer"' in card.text
    model = hub.load("alice/pipe-style", subfolder="transformer", cache_dir=tmp_path / "cache")
    assert torch.equal(_out(model), _out(fluxq))


def test_auth_failures_leave_the_repo_unchanged(server, fluxq, tmp_path):
    folder = _saved(fluxq, tmp_path, "alice/auth")
    with pytest.raises(hub.HubAuthError, match=r"401.*|rejected the token") as e:
        hub.push(folder, "alice/auth", token="hf_wrong")
    assert "alice/auth" in str(e.value) and "unchanged" in str(e.value)
    assert "alice/auth" not in server.repos

    hub.push(folder, "alice/auth", token=TOKEN)
    head = server.head("alice/auth")
    with pytest.raises(hub.HubAuthError, match="403") as e:  # bob has a valid token, but not alice's namespace
        hub.push(folder, "alice/auth", token=BOB, create=False)
    assert "unchanged" in str(e.value) and server.head("alice/auth") == head


def test_missing_repo_errors(server, fluxq, tmp_path):
    folder = _saved(fluxq, tmp_path, "alice/missing")
    with pytest.raises(hub.HubRepoNotFoundError, match="'alice/missing' not found") as e:
        hub.push(folder, "alice/missing", token=TOKEN, create=False)
    assert "create=True" in str(e.value) and "alice/missing" not in server.repos
    with pytest.raises(hub.HubRepoNotFoundError, match="alice/nothing-here"):
        hub.pull("alice/nothing-here", cache_dir=tmp_path / "cache")
    with pytest.raises(hub.HubRepoNotFoundError, match="alice/nothing-here"):
        hub.inspect_repo("alice/nothing-here")
    # A private repo is "not found" to someone else, as on the Hub; its owner pulls it.
    hub.push(folder, "alice/private", token=TOKEN, private=True)
    with pytest.raises(hub.HubRepoNotFoundError, match="alice/private"):
        hub.pull("alice/private", cache_dir=tmp_path / "bob", token=BOB)
    assert (hub.pull("alice/private", cache_dir=tmp_path / "alice", token=TOKEN) / "config.json").is_file()


def _upload16(repo_id: str, folder: Path) -> None:
    """Put a 16-bit model on the server with the plain client (what a model author's repo looks like)."""
    api = HfApi(token=TOKEN)
    api.create_repo(repo_id)
    ops = [CommitOperationAdd(p.name, str(p)) for p in folder.iterdir() if p.is_file()]
    api.create_commit(repo_id, ops, commit_message="16-bit model")


def test_quantize_a_hub_repo_and_push(server, flux16, fluxq, tmp_path):
    _upload16("alice/flux16", flux16)
    folder, result = hub.quantize_and_push("alice/flux16", "alice/flux16-svdq", rank=16, token=TOKEN,
                                           save_directory=tmp_path / "out")  # fmt: skip
    assert result.commit_id == server.head("alice/flux16-svdq")
    assert ModelCard.load(folder / "README.md").data.base_model == "alice/flux16"
    assert torch.equal(_out(hub.load("alice/flux16-svdq", cache_dir=tmp_path / "cache")), _out(fluxq))


def test_refuses_to_overwrite_a_different_model_unless_told(server, flux16, fluxq, tmp_path):
    # The repo holds the 16-bit model: a quantized push would replace it.
    _upload16("alice/flux16", flux16)
    head, before = server.head("alice/flux16"), server.files("alice/flux16")

    folder = _saved(fluxq, tmp_path, "alice/flux16")
    with pytest.raises(hub.RepoHoldsDifferentModelError, match="quantization_config") as e:
        hub.push(folder, "alice/flux16", token=TOKEN)
    assert "overwrite=True" in str(e.value) and "unchanged" in str(e.value)
    assert server.head("alice/flux16") == head and server.files("alice/flux16") == before

    result = hub.push(folder, "alice/flux16", token=TOKEN, overwrite=True)
    assert result.parent_commit == head
    assert (
        server.files("alice/flux16")["diffusion_pytorch_model.safetensors"]
        == (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    # Another architecture (other layer sizes) is refused too.
    other = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                                   pooled_projection_dim=64, axes_dims_rope=[16, 24, 24])  # fmt: skip
    other.to(torch.bfloat16).save_pretrained(tmp_path / "other16")
    with pytest.raises(hub.RepoHoldsDifferentModelError, match="num_single_layers"):
        hub.push(_saved(_quantize(tmp_path / "other16"), tmp_path, "alice/flux16"), "alice/flux16", token=TOKEN)
    assert server.head("alice/flux16") == result.commit_id


def test_connection_dropped_mid_commit_leaves_the_repo_unchanged(server, fluxq, tmp_path):
    folder = _saved(fluxq, tmp_path, "alice/fault")
    first = hub.push(folder, "alice/fault", token=TOKEN)
    before = server.files("alice/fault")
    q = _saved(fluxq, tmp_path, "alice/fault", quality={"note": "second upload"})
    server.fault = "commit"
    with pytest.raises(hub.HubUploadError) as e:
        hub.push(q, "alice/fault", token=TOKEN)
    msg = str(e.value)
    assert "remote repo 'alice/fault' is unchanged" in msg and first.commit_id in msg
    assert server.dropped == 1
    assert server.head("alice/fault") == first.commit_id and server.files("alice/fault") == before

    server.fault = None
    again = hub.push(q, "alice/fault", token=TOKEN)
    assert again.parent_commit == first.commit_id and b"second upload" in server.files("alice/fault")["README.md"]


def test_a_concurrent_push_is_not_overwritten(server, fluxq, tmp_path, monkeypatch):
    first = hub.push(_saved(fluxq, tmp_path, "alice/race"), "alice/race", token=TOKEN)
    check = hub.upload._check_same_model

    def someone_else_commits_meanwhile(api, *args):
        check(api, *args)
        HfApi(token=TOKEN).create_commit("alice/race", [CommitOperationAdd("notes.txt", b"hi")], commit_message="x")

    monkeypatch.setattr(hub.upload, "_check_same_model", someone_else_commits_meanwhile)
    second = _saved(fluxq, tmp_path, "alice/race", quality={"note": "second upload"})
    with pytest.raises(hub.HubUploadError, match=f"moved from {first.commit_id}") as e:
        hub.push(second, "alice/race", token=TOKEN)
    assert "412" in str(e.value)
    # Their commit stands: ours was refused as a whole rather than replacing it (and deleting notes.txt).
    assert server.files("alice/race")["notes.txt"] == b"hi"
    assert server.repos["alice/race"].commits[server.head("alice/race")].title == "x"


def test_connection_dropped_mid_lfs_upload(server, fluxq, tmp_path, monkeypatch):
    """The storage origin drops every PUT half way: the client retries (huggingface_hub's backoff, its sleeps
    skipped here), gives up, and nothing was committed."""
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda s: None)
    folder = _saved(fluxq, tmp_path, "alice/lfs-fault")
    server.fault = "lfs-upload"
    with pytest.raises(hub.HubUploadError, match="remote repo 'alice/lfs-fault' is unchanged"):
        hub.push(folder, "alice/lfs-fault", token=TOKEN)
    assert server.dropped > 1  # retried before giving up
    assert list(server.files("alice/lfs-fault")) == [".gitattributes"]
    assert len(server.repos["alice/lfs-fault"].commits) == 1 and not server.lfs

    # One dropped PUT is retried and the push completes.
    server.fault, server.fault_times, server.dropped = "lfs-upload", 1, 0
    hub.push(folder, "alice/lfs-fault", token=TOKEN)
    assert server.dropped == 1
    assert torch.equal(_out(hub.load("alice/lfs-fault", cache_dir=tmp_path / "cache")), _out(fluxq))


def test_cli_push_inspect_pull(server, flux16, tmp_path, capsys):
    assert cli.main(["push", str(flux16), "alice/cli", "--rank", "16", "--measure-quality", "--base-model",
                     "acme/tiny-flux", "--token", TOKEN]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"commit {server.head('alice/cli')}" in out

    assert cli.main(["inspect", "alice/cli", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (model,) = report["models"]
    assert model["class_name"] == "FluxTransformer2DModel" and model["quantization"]["rank"] == 16
    assert model["ranks"] == [16] and model["quantized_layers"] > model["weight_only_layers"] > 0  # AdaLN: W4A16
    assert report["card"]["svdquant"]["calibration"] is None
    quality = report["card"]["svdquant"]["quality"]
    assert 0 < quality["relative error vs 16-bit (one denoiser call)"] < 0.2
    assert 0.98 < quality["cosine vs 16-bit"] <= 1
    # Only the safetensors header was read (Range requests), not whole weight files.
    assert cli.main(["inspect", "alice/cli"]) == 0
    text = capsys.readouterr().out
    assert "SVDQuant rank 16, format_version 3, dtype bfloat16" in text

    assert cli.main(["pull", "alice/cli", "--cache-dir", str(tmp_path / "cache")]) == 0
    snapshot = Path(capsys.readouterr().out.strip())
    assert (snapshot / "diffusion_pytorch_model.safetensors").is_file()
    local = hub.inspect_repo(snapshot)
    assert local.models[0].quantized_layers == model["quantized_layers"]
    # Pushing an SVDQuant checkpoint loads it as saved (no re-quantization) and re-saves it with its card.
    assert cli.main(["push", str(snapshot), "alice/cli-copy", "--rank", "8", "--dtype", "fp16", "--token", TOKEN]) == 0
    capsys.readouterr()
    copy = hub.load("alice/cli-copy", cache_dir=tmp_path / "cache")
    assert copy.config.quantization_config.rank == 16 and copy.dtype == torch.bfloat16
    assert torch.equal(_out(copy), _out(hub.load("alice/cli", cache_dir=tmp_path / "cache")))


def _fused(flux16) -> FluxTransformer2DModel:
    """A quantized model with two LoRAs fused into some layers (ranks 16 + 4, 16 + 4 + 8), wrappers unloaded."""
    model = _quantize(flux16)
    names = [n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)][:4]
    g = torch.Generator().manual_seed(0)
    for adapter, r, layers in (("style", 4, names), ("detail", 8, names[:2])):
        sd = {}
        for n in layers:
            m = model.get_submodule(n)
            sd[f"{n}.lora_A.weight"] = (torch.randn(r, m.in_features, generator=g) * 0.05).to(torch.bfloat16)
            sd[f"{n}.lora_B.weight"] = (torch.randn(m.out_features, r, generator=g) * 0.05).to(torch.bfloat16)
        model.load_lora_adapter(sd, adapter_name=adapter, prefix=None)
    model.set_adapters(["style", "detail"], weights=[1.0, 0.5])
    model.fuse_lora()
    model.unload_lora()
    return model


def test_cli_push_of_a_fused_model_names_its_loras(server, flux16, tmp_path, capsys):
    """save_quantized's card lists the fused LoRAs from the layers; `svdquant push` of that folder reloads it (mixed
    ranks read from the tensors) and carries the names over; a folder saved without a card says they are unnamed."""
    model = _fused(flux16)
    folder = _saved(model, tmp_path, "alice/fused")
    meta = ModelCard.load(folder / "README.md").data.to_dict()["svdquant"]
    style, detail = {"name": "style", "layers": 4, "rank": 4}, {"name": "detail", "layers": 2, "rank": 8}
    assert meta["fused_loras"] == [style, detail]
    assert cli.main(["push", str(folder), "alice/fused", "--token", TOKEN]) == 0
    capsys.readouterr()
    loaded = hub.load("alice/fused", cache_dir=tmp_path / "cache")
    assert torch.equal(_out(loaded), _out(model))
    assert sorted({m.rank for m in loaded.modules() if isinstance(m, SVDQuantLinear)}) == [16, 20, 28]
    card = server.files("alice/fused")["README.md"].decode()
    assert "## Fused LoRAs" in card and "| `style` | 4 | 4 |" in card and "| `detail` | 2 | 8 |" in card
    assert "4 layers carry a branch wider than the config's `rank`" in card

    model.save_pretrained(tmp_path / "plain")  # no card: the widths are known, the names are not
    assert cli.main(["push", str(tmp_path / "plain"), "alice/fused-plain", "--token", TOKEN]) == 0
    card = server.files("alice/fused-plain")["README.md"].decode()
    assert "4 layers carry a branch wider" in card and "names were not recorded" in card


def test_cli_errors_exit_1_with_the_reason(server, flux16, capsys):
    assert cli.main(["push", str(flux16), "alice/x", "--rank", "16", "--token", "hf_wrong"]) == 1
    err = capsys.readouterr().err
    assert "rejected the token" in err and "'alice/x'" in err and "unchanged" in err
    assert cli.main(["inspect", "alice/none"]) == 1
    assert "alice/none" in capsys.readouterr().err


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "hub_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_and_push_script_with_calibration(server, flux16, tmp_path, capsys):
    model16 = FluxTransformer2DModel.from_pretrained(flux16, torch_dtype=torch.bfloat16).eval()
    # The per-layer smoothing search is calibration's business (tests/test_calibration.py): skip it here.
    stats = diffusers_svdquant.calibrate(model16, run=lambda m: run(m, FLUX.inputs(torch.bfloat16)), search=False)
    stats.save(tmp_path / "stats.safetensors")
    argv = [str(flux16), "alice/calibrated", "--rank", "16", "--calibration", str(tmp_path / "stats.safetensors"),
            "--token", TOKEN, "--save-dir", str(tmp_path / "saved")]  # fmt: skip
    assert _script("quantize_and_push").main(argv) == 0
    # The pushed model is what quantize-on-load with the same config gives.
    expected = FluxTransformer2DModel.from_pretrained(
        flux16, torch_dtype=torch.bfloat16,
        quantization_config=SVDQuantConfig(rank=16, calibration=str(tmp_path / "stats.safetensors")),
    ).eval()  # fmt: skip
    got = hub.load("alice/calibrated", cache_dir=tmp_path / "cache")
    assert torch.equal(_out(got), _out(expected))
    smooth = got.transformer_blocks[0].attn.to_q.smooth
    assert not torch.all(smooth == 1)  # the statistics were used
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.svdquant["calibration"] == "stats.safetensors" and "`stats.safetensors`" in card.text
    assert _script("inspect_repo").main(["alice/calibrated"]) == 0
    assert "rank 16" in capsys.readouterr().out


def test_pipeline_repo_pull_and_generate(server, tmp_path):
    from diffusers import FluxPipeline
    from diffusers.quantizers import PipelineQuantizationConfig
    from models import build_pipeline
    from PIL import Image

    pipe16 = build_pipeline(tmp_path)
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": SVDQuantConfig(rank=16)})
    pipe = FluxPipeline.from_pretrained(pipe16, quantization_config=pq, torch_dtype=torch.float32)
    folder = hub.save_quantized(pipe, tmp_path / "qpipe", repo_id="alice/pipe", base_model="acme/tiny-flux-pipe")
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and "DiffusionPipeline.from_pretrained" in card.text
    hub.push(folder, "alice/pipe", token=TOKEN)
    report = {m.path: m for m in hub.inspect_repo("alice/pipe").models}
    assert report["transformer"].quantization["rank"] == 16 and report["transformer"].quantized_layers > 0
    assert report["vae"].quantization is None and report["text_encoder_2"].quantization is None

    out = tmp_path / "img" / "cat.png"
    small = ["--steps", "2", "--height", "32", "--width", "32", "--cache-dir", str(tmp_path / "cache"),
             "--set", "max_sequence_length=16", "--set", "guidance_scale=1.0"]  # fmt: skip
    args = ["alice/pipe", "--prompt", "a cat", "--out", str(out), *small]
    assert _script("pull_and_generate").main(args) == 0
    image = Image.open(out)
    assert image.size == (32, 32)
    # The same through the quantized model repo + a 16-bit base pipeline (--base), and `svdquant generate`.
    transformer = hub.load("alice/pipe", subfolder="transformer", cache_dir=tmp_path / "cache")
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, SVDQuantLinear)
    assert cli.main(["generate", "alice/pipe", "--subfolder", "transformer", "--base", str(pipe16), "--prompt",
                     "a cat", "--out", str(tmp_path / "b.png"), *small]) == 0  # fmt: skip
    assert Image.open(tmp_path / "b.png").tobytes() == image.tobytes()
    assert os.path.getsize(out) > 0


def test_hf_endpoint_in_a_fresh_process(server, fluxq, tmp_path):
    """No patched constants: a new process configured only by HF_ENDPOINT (as a user would) reads the repo."""
    hub.push(_saved(fluxq, tmp_path, "alice/env"), "alice/env", token=TOKEN)
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "home")}
    code = "from diffusers_svdquant.apps import cli; raise SystemExit(cli.main(['inspect', 'alice/env']))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"alice/env @ {server.head('alice/env')}" in proc.stdout and "SVDQuant rank 16" in proc.stdout
