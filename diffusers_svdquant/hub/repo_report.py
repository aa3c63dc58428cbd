"""What a (remote or local) quantized repo holds, from its configs and safetensors headers only."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import (
    HfApi,
    ModelCard,
    hf_hub_download,
)

from .errors import HubError, pull_error
from .upload import config_paths


@dataclass
class ModelReport:
    """One model in a repo: where, its class, its quantization settings and what its weight files hold."""

    path: str
    class_name: str | None
    quantization: dict | None
    quantized_layers: int = 0
    weight_only_layers: int = 0
    ranks: list[int] = field(default_factory=list)
    tensors: int = 0
    weight_files: list[str] = field(default_factory=list)
    weight_bytes: int = 0


@dataclass
class RepoReport:
    """What :func:`inspect_repo` found."""

    repo: str
    revision: str | None
    commit: str | None
    files: dict[str, int]
    models: list[ModelReport]
    card: dict | None
    branches: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        from dataclasses import asdict

        return asdict(self)

    def format(self) -> str:
        """A human-readable summary."""
        lines = [f"{self.repo}" + (f" @ {self.commit}" if self.commit else "")]
        if self.branches:
            lines.append("branches: " + ", ".join(f"{b} -> {c[:12]}" for b, c in sorted(self.branches.items())))
        lines.append(f"{len(self.files)} files, {sum(self.files.values()):,} bytes")
        for m in self.models:
            where = m.path or "."
            if m.quantization is None:
                lines.append(f"  {where}: {m.class_name} (not SVDQuant)")
                continue
            q = m.quantization
            lines.append(
                f"  {where}: {m.class_name}, SVDQuant rank {q.get('rank')}, format_version "
                f"{q.get('format_version')}, dtype {q.get('torch_dtype')}: {m.quantized_layers} quantized layers "
                f"({m.quantized_layers - m.weight_only_layers} W4A4, {m.weight_only_layers} W4A16), "
                f"{m.tensors} tensors in {len(m.weight_files)} file(s), {m.weight_bytes:,} bytes"
            )
        if self.card:
            meta = self.card.get("svdquant") or {}
            if self.card.get("base_model"):
                lines.append(f"base model: {self.card['base_model']}")
            if meta.get("bytes_16bit"):
                lines.append(f"card: 16-bit {meta['bytes_16bit']:,} bytes -> {meta.get('bytes_quantized', 0):,} bytes")
            for k, v in (meta.get("quality") or {}).items():
                lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def _summarize(report: ModelReport, headers: dict[str, dict[str, tuple[str, list[int]]]]) -> None:
    for name, tensors in headers.items():
        report.weight_files.append(name)
        report.tensors += len(tensors)
        for key, (_, shape) in tensors.items():
            if key.endswith(".qweight"):
                report.quantized_layers += 1
            if key.endswith(".wmins"):  # a weight-only (W4A16) layer
                report.weight_only_layers += 1
            elif key.endswith(".lora_down") and len(shape) == 2 and shape[1] not in report.ranks:
                report.ranks.append(shape[1])


def inspect_repo(
    repo: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> RepoReport:
    """Describe a quantized repo (Hub id) or a saved folder: files, models, settings, layers, ranks, sizes.

    Remote repos are read through the API and ``Range`` requests on the safetensors headers: no weights download.
    """
    from safetensors import safe_open

    if Path(repo).is_dir():
        root = Path(repo)
        files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}

        def read_json(path: str) -> dict:
            return json.loads((root / path).read_text())

        def header(path: str) -> dict[str, tuple[str, list[int]]]:
            with safe_open(root / path, "pt") as f:
                return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}

        card = ModelCard.load(root / "README.md").data.to_dict() if "README.md" in files else None
        commit, branches = None, {}
    else:
        repo = str(repo)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            info = api.model_info(repo, revision=revision, files_metadata=True)
            branches = {b.name: b.target_commit for b in api.list_repo_refs(repo).branches}
        except Exception as e:
            mapped = pull_error(e, repo, revision, api.endpoint)
            if mapped is None:
                raise
            raise mapped from e
        commit = info.sha
        files = {s.rfilename: s.size or 0 for s in info.siblings or []}
        tmp = tempfile.TemporaryDirectory(prefix="svdquant-inspect-")

        def read_json(path: str) -> dict:
            got = hf_hub_download(repo, path, revision=commit, cache_dir=tmp.name, token=token, endpoint=api.endpoint)
            return json.loads(Path(got).read_text())

        def header(path: str) -> dict[str, tuple[str, list[int]]]:
            meta = api.parse_safetensors_file_metadata(repo, path, revision=commit)
            return {k: (t.dtype, list(t.shape)) for k, t in meta.tensors.items()}

        card = None
        if "README.md" in files:
            got = hf_hub_download(
                repo, "README.md", revision=commit, cache_dir=tmp.name, token=token, endpoint=api.endpoint
            )
            card = ModelCard.load(got).data.to_dict()

    models = []
    for cfg_path in config_paths(list(files)):
        if cfg_path.endswith("model_index.json"):
            continue
        cfg = read_json(cfg_path)
        sub = cfg_path.rpartition("/")[0]
        qc = cfg.get("quantization_config")
        report = ModelReport(
            sub,
            cfg.get("_class_name") or (cfg.get("architectures") or [None])[0],
            qc if isinstance(qc, dict) and qc.get("quant_method") == "svdquant" else None,
        )
        prefix = f"{sub}/" if sub else ""
        weights = sorted(
            f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :] and f.endswith(".safetensors")
        )
        _summarize(report, {w: header(w) for w in weights})
        report.weight_bytes = sum(files[w] for w in weights)
        models.append(report)
    if not Path(repo).is_dir():
        tmp.cleanup()
    if not models:
        raise HubError(f"{repo}: no config.json found at the root or one folder down: not a diffusers model repo")
    return RepoReport(str(repo), revision, commit, files, models, card, branches)
