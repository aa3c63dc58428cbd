"""`SVDQuantConfig`: the user-facing settings, serialized into ``config.json``."""

from __future__ import annotations

import fnmatch
import logging
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from .reference import GROUP_SIZE

try:
    # One config class for both libraries: as a subclass of transformers' mixin too, SVDQuantConfig is
    # accepted by its registry (which checks issubclass), and diffusers' PipelineQuantizationConfig finds
    # the same class, hence the same __init__ signature, under "svdquant" in both mappings.
    from transformers.utils.quantization_config import QuantizationConfigMixin as _HfQuantizationConfigMixin
except ImportError:  # transformers absent or unusable: the config still serves diffusers

    class _HfQuantizationConfigMixin:  # type: ignore[no-redef]
        """Stand-in base used when transformers cannot be imported."""


# 3: weight-only (W4A16) layers, chosen by weight_only_modules, with a `wmins` tensor each.
# 2: modules_to_not_convert patterns match as substrings (as in diffusers' other backends), "^" anchors.
# 1: they matched exact names, parents and globs only; version-1 configs keep that meaning at reload.
# Configs of versions 1 and 2 have no weight-only layers: their checkpoints reload as they were saved.
FORMAT_VERSION = 3
# Rank of the 16-bit low-rank branch unless a user picks another: the paper's and Nunchaku's choice.
DEFAULT_RANK = 32
# Alternating refinement of the low-rank branch with the quantized residual (SVDQuantConfig.lowrank_iters).
DEFAULT_LOWRANK_ITERS = 3

logger = logging.getLogger(__name__)

# Kept in 16-bit by default, following Nunchaku's choice for FLUX / SD3 / SDXL: the input and output
# projections and embedders see raw latents / text features whose scale differs per token, the AdaLN
# modulation linears ("*norm*") produce per-channel scales and shifts that multiply every activation
# downstream, and the time embeddings are tiny (Z-Image's t_embedder is also read as .weight.dtype by
# diffusers' own code, which a quantized layer does not have). Together they are a few percent of the weights.
# The top-level modules are anchored ("^"): a FLUX single block's own proj_out is quantized.
DEFAULT_MODULES_TO_NOT_CONVERT: tuple[str, ...] = (
    "^x_embedder",
    "^context_embedder",
    "^pos_embed",
    "^time_text_embed",
    "^time_embed.emb",
    "^adaln_single.emb",
    "^time_embedding",
    "^t_embedder",
    "^add_embedding",
    "^encoder_hid_proj",
    "^caption_projection",
    "^proj_in",
    "^proj_out",
    "^norm_out",
    "*time_emb_proj",
    "^lm_head",
    # The same kinds of layers in other families, kept 16-bit where it measured better on their tiny models
    # (relative output error vs bf16, tests/test_families.py): Qwen-Image's input embedders and AdaLN
    # modulation 0.130 -> 0.008, Chroma's guidance/modulation MLP 0.072 -> 0.033, FLUX.2's modulation and
    # time/guidance embedder 0.015 -> 0.006, Wan's condition embedder 0.026 -> 0.019. (Lumina2's
    # time_caption_embed and Z-Image's cap_embedder / adaLN_modulation measured no gain: quantized.)
    "^img_in",
    "^txt_in",
    "*.img_mod.*",
    "*.txt_mod.*",
    "^distilled_guidance_layer",
    "*stream_modulation*",
    "^time_guidance_embed",
    "^condition_embedder",
)
# Quantized weight-only (W4A16) by default: the AdaLN modulation linears ("*norm*": FLUX's and SD3's
# norm1.linear / norm1_context.linear / norm.linear, a third of a FLUX block's weights; the modulation
# linear of SANA's / LTX's time_embed and PixArt's adaln_single, whose timestep MLP `.emb` stays 16-bit
# above, as every family's time embedder does: quantizing PixArt's tripled its error). They produce
# per-channel scales and shifts (W4A4 there costs quality) from one token per image (so 4-bit activations
# buy no speed); 4-bit weights make the model 3.5x smaller instead of 2.1x. Measured: README, "Per-layer
# precision". Matched after modules_to_not_convert, which wins (``^norm_out`` stays 16-bit).
DEFAULT_WEIGHT_ONLY_MODULES: tuple[str, ...] = ("*norm*", "^time_embed.linear", "^adaln_single.linear")
_GLOB_CHARS = frozenset("*?[")


class SVDQuantMethod(str, Enum):
    """The ``quant_method`` key. diffusers reads ``quant_method.value``, so it must be a str-Enum."""

    SVDQUANT = "svdquant"


def pattern_matches(name: str, pattern: str, format_version: int = FORMAT_VERSION) -> bool:
    """Whether one ``modules_to_not_convert`` pattern selects the module called ``name``.

    * ``"^proj_out"``: anchored, the module ``proj_out`` and every module below it;
    * a pattern with ``*``, ``?`` or ``[``: an fnmatch glob over the whole name (``"*norm*"``);
    * anything else: a substring of the name, as diffusers' other backends match it (``"to_q"`` is
      every ``*.to_q``). Configs of ``format_version`` 1 matched a plain pattern as an exact name or a
      parent instead, and keep that meaning, so their checkpoints select the same layers at reload.
    """
    if pattern.startswith("^"):
        anchored = pattern[1:]
        return name == anchored or name.startswith(anchored + ".")
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    if format_version < 2:
        return name == pattern or name.startswith(pattern + ".")
    return pattern in name


def module_matches(name: str, patterns: list[str] | tuple[str, ...], format_version: int = FORMAT_VERSION) -> bool:
    """True when a module name matches one of ``patterns`` (see :func:`pattern_matches`)."""
    return any(pattern_matches(name, p, format_version) for p in patterns)


def component_patterns(names: list[str] | tuple[str, ...]) -> list[str]:
    """Patterns for module names given as path components, the way diffusers and transformers read their
    ``_keep_in_fp32_modules`` (T5's ``"wo"`` is every ``...DenseReluDense.wo``): the top-level module,
    any module of that name below another, and everything inside them."""
    return [p for n in sorted(set(names)) for p in (f"^{n}", f"*.{n}", f"*.{n}.*")]


class SVDQuantConfig(QuantizationConfigMixin, _HfQuantizationConfigMixin):
    """Settings of SVDQuant quantization (arXiv 2411.05007): W4A4 layers, weight-only W4A16 ones, 16-bit ones.

    The same object works as ``quantization_config`` of a diffusers model's and of a transformers
    model's ``from_pretrained`` (e.g. a T5 / CLIP text encoder); see
    :mod:`diffusers_svdquant.integrations.transformers_quantizer`.

    Args:
        rank: rank ``r`` of the 16-bit low-rank branch (at most ``min(N, K)`` of every quantized
            layer; 0 drops the branch: plain W4A4, the baseline the quality report compares with).
        group_size: INT4 group size along K. Only :data:`~diffusers_svdquant.reference.GROUP_SIZE` (64)
            is supported: the kernels are built for it. Recorded so a checkpoint says what it holds.
        precision: ``"int4"``.
        modules_to_not_convert: a list of module-name patterns kept in 16-bit: a substring of the name
            (``"to_q"``: every ``*.to_q``, as in diffusers' other backends), ``"^name"`` (that module and
            everything below it) or an fnmatch glob (``"*norm*"``); see :func:`pattern_matches`. ``None``
            uses :data:`DEFAULT_MODULES_TO_NOT_CONVERT`. A pattern that matches no module of the model
            is warned about by name.
        weight_only_modules: patterns (the same forms) of layers quantized weight-only, W4A16
            (:class:`~diffusers_svdquant.W4A16Linear`: 4-bit weights with a per-group scale and minimum,
            16-bit activations) instead of W4A4; ``["*"]`` makes every quantized layer W4A16 (text
            encoders). ``modules_to_not_convert`` wins over it. ``None`` uses
            :data:`DEFAULT_WEIGHT_ONLY_MODULES` (the AdaLN modulation linears); configs of
            ``format_version`` < 3 had no weight-only layers and keep none at reload.
        smoothing_alpha: ``None`` (default): each layer uses the ``(α, β)`` its calibration search
            found, or ``α = β = 0.5`` where none was searched. A number ``α`` forces
            ``λ_j = max|X_j|^α / max|W_j|^(1-α)`` on every layer. Without statistics for a layer,
            ``λ = 1`` (no smoothing).
        calibration: activation statistics: a :class:`~diffusers_svdquant.CalibrationStats` (what
            :func:`~diffusers_svdquant.calibrate` returns), the path of a file it saved, or a mapping
            from module name to a float tensor ``[K]`` of per-input-channel absmax. Not serialized:
            it only matters while quantizing.
        svd_method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (``torch.svd_lowrank``, seeded),
            or ``"auto"`` (exact up to 1024 on the short side, randomized above).
        lowrank_iters: refinement iterations ``L ← SVD_r(Ŵ − Q(Ŵ − L))``; the best by weight error is kept.
            Default :data:`DEFAULT_LOWRANK_ITERS` (3): on real MiniLM (every linear W4A4) the held-out mean
            cosine went 0.936 -> 0.942 uncalibrated and 0.976 -> 0.978 calibrated + GPTQ (README, quality).
        gptq: round the INT4 residual with GPTQ (error compensation against the calibration inputs'
            ``XᵀX``, gathered by ``calibrate(..., hessian=True)``). ``None`` (default): wherever the
            statistics carry ``XᵀX``; ``True``: the same, and a warning for every layer without it
            (round-to-nearest there); ``False``: round to nearest everywhere. Changes only the codes and
            scales, not the format.
        scale_search: W4A4 residual groups take the scale among ``1.0, 0.95 … 0.7 × absmax / 7`` with the
            smallest error (weighted by the group's ``XᵀX`` block when the statistics carry it), also inside
            GPTQ; ``False``: ``absmax / 7`` (plain round-to-nearest, the naive baselines). Measured on real
            MiniLM: uncalibrated 0.933 -> 0.936, calibrated + GPTQ 0.969 -> 0.971 (README, quality).
        torch_dtype: dtype the model was quantized in, recorded so a reload without ``torch_dtype``
            gives the same model. Set by the quantizer.
        format_version: on-disk format version (docs/design.md §2).
    """

    def __init__(
        self,
        rank: int = DEFAULT_RANK,
        group_size: int = GROUP_SIZE,
        precision: str = "int4",
        modules_to_not_convert: list[str] | None = None,
        weight_only_modules: list[str] | None = None,
        smoothing_alpha: float | None = None,
        calibration: Any = None,
        svd_method: str = "auto",
        lowrank_iters: int = DEFAULT_LOWRANK_ITERS,
        gptq: bool | None = None,
        scale_search: bool = True,
        torch_dtype: str | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        quant_method = kwargs.pop("quant_method", SVDQuantMethod.SVDQUANT)
        if quant_method != SVDQuantMethod.SVDQUANT:
            raise ValueError(f"SVDQuantConfig got quant_method={quant_method!r}; expected 'svdquant'")
        if kwargs:
            raise ValueError(f"SVDQuantConfig got unknown settings: {sorted(kwargs)}")
        self.quant_method = SVDQuantMethod.SVDQUANT
        self.rank = rank
        self.group_size = group_size
        self.precision = precision
        for setting, value in (("modules_to_not_convert", modules_to_not_convert),
                               ("weight_only_modules", weight_only_modules)):  # fmt: skip
            if isinstance(value, str):
                # list("proj_out") would be ["p", "r", ...]: patterns that select the wrong layers without a word.
                raise ValueError(
                    f"SVDQuantConfig: {setting} must be a list of module-name patterns, got the string "
                    f"{value!r}; write [{value!r}]"
                )
        self.modules_to_not_convert = (
            list(DEFAULT_MODULES_TO_NOT_CONVERT) if modules_to_not_convert is None else list(modules_to_not_convert)
        )
        if weight_only_modules is None:
            new_format = isinstance(format_version, int) and format_version >= 3
            weight_only_modules = list(DEFAULT_WEIGHT_ONLY_MODULES) if new_format else []
        self.weight_only_modules = list(weight_only_modules)
        self.smoothing_alpha = smoothing_alpha
        self.calibration = calibration
        self.svd_method = svd_method
        self.lowrank_iters = lowrank_iters
        self.gptq = gptq
        self.scale_search = scale_search
        self.torch_dtype = torch_dtype
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """Validate the settings; raise ``ValueError`` naming the bad one."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"SVDQuantConfig: rank must be an integer >= 0, got {self.rank!r}")
        if self.group_size != GROUP_SIZE:
            raise ValueError(
                f"SVDQuantConfig: group_size must be {GROUP_SIZE} (the kernels' group), got {self.group_size!r}"
            )
        if self.precision != "int4":
            raise ValueError(f"SVDQuantConfig: precision must be 'int4', got {self.precision!r}")
        if self.smoothing_alpha is not None and (
            isinstance(self.smoothing_alpha, bool)
            or not isinstance(self.smoothing_alpha, (int, float))
            or not 0.0 <= float(self.smoothing_alpha) <= 1.0
        ):
            raise ValueError(
                f"SVDQuantConfig: smoothing_alpha must be None (searched per layer) or in [0, 1], "
                f"got {self.smoothing_alpha!r}"
            )
        if self.svd_method not in ("auto", "exact", "randomized"):
            raise ValueError(
                f"SVDQuantConfig: svd_method must be 'auto', 'exact' or 'randomized', got {self.svd_method!r}"
            )
        if isinstance(self.lowrank_iters, bool) or not isinstance(self.lowrank_iters, int) or self.lowrank_iters < 0:
            raise ValueError(f"SVDQuantConfig: lowrank_iters must be an integer >= 0, got {self.lowrank_iters!r}")
        if self.gptq not in (None, True, False):
            raise ValueError(f"SVDQuantConfig: gptq must be None, True or False, got {self.gptq!r}")
        if not isinstance(self.scale_search, bool):
            raise ValueError(f"SVDQuantConfig: scale_search must be True or False, got {self.scale_search!r}")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(
                f"SVDQuantConfig: format_version must be an integer >= 1, got {self.format_version!r} "
                f"({type(self.format_version).__name__})"
            )
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"SVDQuantConfig: checkpoint format_version {self.format_version} is newer than this "
                f"diffusers-svdquant understands ({FORMAT_VERSION}); upgrade diffusers-svdquant"
            )
        for setting in ("modules_to_not_convert", "weight_only_modules"):
            value = getattr(self, setting)
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"SVDQuantConfig: {setting} must be a list of strings")
        if self.weight_only_modules and self.format_version < 3:
            raise ValueError(
                f"SVDQuantConfig: weight_only_modules needs format_version >= 3, got {self.format_version}"
            )

    def is_excluded(self, module_name: str) -> bool:
        """True when ``module_name`` stays in 16-bit by :attr:`modules_to_not_convert`."""
        return module_matches(module_name, self.modules_to_not_convert, self.format_version)

    def is_weight_only(self, module_name: str) -> bool:
        """True when the quantized layer ``module_name`` is W4A16 by :attr:`weight_only_modules` (whether it
        is quantized at all is :func:`quantizable_linears`' decision)."""
        return module_matches(module_name, self.weight_only_modules, self.format_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings for ``config.json`` (the calibration statistics are not part of it)."""
        return {
            "quant_method": self.quant_method.value,
            "rank": self.rank,
            "group_size": self.group_size,
            "precision": self.precision,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "weight_only_modules": list(self.weight_only_modules),
            "smoothing_alpha": self.smoothing_alpha,
            "svd_method": self.svd_method,
            "lowrank_iters": self.lowrank_iters,
            "gptq": self.gptq,
            "scale_search": self.scale_search,
            "torch_dtype": self.torch_dtype,
            "format_version": self.format_version,
        }

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        default = SVDQuantConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k) != v}


def quantizable_linears(model: nn.Module, config: SVDQuantConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``config`` quantizes, by name: the one selection rule.

    A linear stays in 16-bit when a :attr:`SVDQuantConfig.modules_to_not_convert` pattern matches
    it or when its ``in_features`` is not a multiple of :data:`GROUP_SIZE` (documented fallback).
    The same rule decides at calibration, at quantization and at reload, so a checkpoint needs no
    per-layer list.

    Raises:
        ValueError: a target layer is smaller than the rank (names the layer and its shape).
    """
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or config.is_excluded(name):
            continue
        if module.in_features % GROUP_SIZE:
            logger.info(
                "svdquant: %s keeps 16-bit weights (in_features=%d is not a multiple of %d)",
                name, module.in_features, GROUP_SIZE,
            )  # fmt: skip
            continue
        if config.rank > min(module.in_features, module.out_features):
            raise ValueError(
                f"SVDQuantConfig: rank {config.rank} is larger than min(out, in) = "
                f"{min(module.in_features, module.out_features)} of layer {name!r} "
                f"(weight [{module.out_features}, {module.in_features}]); lower the rank or add the layer "
                f"to modules_to_not_convert"
            )
        found[name] = module
    return found
