"""LoRA on SVDQuant layers through PEFT, the library diffusers and transformers load every LoRA with.

PEFT wraps each targeted layer in a ``LoraLayer`` chosen by ``LoraModel._create_new_module``, a first-match list of
dispatchers that knows ``nn.Linear`` and a few quantized layer kinds but not :class:`SVDQuantLinear`.
:func:`register_peft` (installed by :mod:`.peft_hook` when peft's LoRA package is first imported) puts one check
in front of that list: a target whose base layer is an :class:`SVDQuantLinear` becomes an
:class:`SVDQuantLoraLinear`; every other layer (those kept 16-bit included) goes to PEFT's own dispatchers
unchanged. This hook is the one every entry point passes through —
diffusers' ``load_lora_adapter`` (which builds its ``LoraConfig`` itself), transformers' ``load_adapter``,
``add_adapter``, ``inject_adapter_in_model`` and ``get_peft_model`` — whereas ``LoraConfig._register_custom_module``
only reaches configs the caller builds.

Unfused, the adapters keep PEFT's semantics (adapter switching, weights, disable, mixed batches); for CPU inference
their columns are appended to the low-rank branch for the call only, so the layer is still one GEMM pass, and
elsewhere (training, CUDA) they run beside the fused W4A4 kernel in 16-bit (PEFT's own ``Linear.forward``).
Fused (``merge``, what ``fuse_lora`` calls), an adapter ``B·A`` with scale ``s`` is appended
to the layer's low-rank branch, which sees the smoothed input ``x̂ = x / λ``: ``x Aᵀ = x̂ (diag(λ) Aᵀ)``, so
``lora_down ← [lora_down | diag(λ)·Aᵀ]`` and ``lora_up ← [lora_up | s·B]``; the 4-bit residual is untouched and the
layer stays one kernel call. ``unmerge`` drops exactly the columns that were appended, so the layer's tensors are
bit for bit what they were.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..linear import SVDQuantLinear

# The base layer's record of the adapters fused into its branch, in order: [(adapter name, columns)]. A plain
# attribute (never in the state dict); it outlives the PEFT wrapper, so unload_lora_weights after fuse_lora keeps it
# and the model card can name the fused LoRAs.
FUSED_ATTR = "svdquant_fused_loras"


def fused_loras(layer: SVDQuantLinear) -> list[tuple[str, int]]:
    """The adapters fused into ``layer``'s low-rank branch, oldest first: ``[(adapter name, rank)]``."""
    return list(getattr(layer, FUSED_ATTR, ()))


def branch_columns(
    layer: SVDQuantLinear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter as columns of ``layer``'s low-rank branch: ``(diag(λ)·Aᵀ, s·B)``.

    Args:
        layer: the quantized layer (``smooth`` ``[K]`` is λ).
        lora_a: the adapter's down projection ``A`` ``[r, K]``.
        lora_b: its up projection ``B`` ``[N, r]``.
        scale: ``s`` (PEFT's ``lora_alpha / r`` times the adapter weight).
        check: refuse a non-finite result (merging); a forward call skips the check.

    Returns:
        ``[K, r]`` and ``[N, r]`` in the layer's dtype and on its device, computed in float32 and rounded once.

    Raises:
        ValueError: a product that overflows the layer's dtype (float16 with a large λ).
    """
    dtype, device = layer.lora_down.dtype, layer.lora_down.device
    down = (layer.smooth.float().unsqueeze(1) * lora_a.detach().to(device).float().t()).to(dtype)
    up = (lora_b.detach().to(device).float() * scale).to(dtype)
    if check and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise ValueError(
            f"svdquant: fusing this LoRA into a {type(layer).__name__} [{layer.out_features}, {layer.in_features}] "
            f"overflows {dtype} (diag(smooth)·Aᵀ or scale·B is not finite); keep it unfused"
        )
    return down, up


def append_branch(layer: SVDQuantLinear, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """Append ``down`` ``[K, r]`` / ``up`` ``[N, r]`` to ``layer``'s branch and record them under ``name``."""
    r = down.shape[1]
    layer.lora_down = nn.Parameter(torch.cat([layer.lora_down.detach(), down], 1), requires_grad=False)
    layer.lora_up = nn.Parameter(torch.cat([layer.lora_up.detach(), up], 1), requires_grad=False)
    layer.rank = layer.lora_down.shape[1]
    setattr(layer, FUSED_ATTR, [*fused_loras(layer), (name, r)])


def remove_branch(layer: SVDQuantLinear) -> str:
    """Drop the columns the last :func:`append_branch` added (the others are not touched: bit-exact); returns the
    adapter name they were recorded under."""
    record = fused_loras(layer)
    if not record:
        raise RuntimeError("svdquant: no fused LoRA columns to remove from this SVDQuantLinear")
    name, r = record.pop()
    keep = layer.lora_down.shape[1] - r
    # clone: the slice would keep the wider storage alive (and the CUDA cache keys on the data pointer).
    layer.lora_down = nn.Parameter(layer.lora_down.detach()[:, :keep].clone(), requires_grad=False)
    layer.lora_up = nn.Parameter(layer.lora_up.detach()[:, :keep].clone(), requires_grad=False)
    layer.rank = keep
    setattr(layer, FUSED_ATTR, record)
    return name


class SVDQuantLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` around an :class:`SVDQuantLinear` (``base_layer``).

    The adapters are PEFT's ``lora_A`` (``[r, K]``) and ``lora_B`` (``[N, r]``) in the layer's dtype, on its device.
    ``forward(x)`` (``[..., K]`` → ``[..., N]`` in the layer's dtype) is the quantized layer's output plus
    ``Σ scaling · B(A(dropout(x)))`` over the active adapters. On CPU without autograd (inference) the active
    adapters ride in the kernel's low-rank branch for the call (the columns ``merge`` would append, built per call
    from the current adapters and weights, accumulated in float32: one GEMM pass); otherwise, and for dropout in
    training, ``lora_bias``, mixed batches and CUDA (fast 16-bit matmuls), it is PEFT's forward beside the layer in
    16-bit. ``merge`` / ``unmerge`` move
    adapters into and out of the layer's low-rank branch (see the module docstring). Plain LoRA only: variants that
    rewrite the dense weight (DoRA, PiSSA/OLoRA-style inits, ...) are refused, as is merging ``lora_bias``.
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT looks at `weight` or `qweight`; the codes are uint8, the model dtype is that of the scales.
        return base_layer.qweight.device, base_layer.wscales.dtype

    def _where(self) -> str:
        base = self.get_base_layer()
        target = self.kwargs.get("target_name")  # PEFT's kwargs: the layer's dotted name in the model
        name = f" {target!r}" if target else ""
        return f"{type(base).__name__}{name} [{base.out_features}, {base.in_features}]"

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            raise ValueError(
                f"svdquant: {self._where()} takes plain LoRA only; this config asks for a variant that needs the "
                f"dense weight ({e})"
            ) from e

    @property
    def lora_variants(self) -> dict[tuple[str, ...], None]:
        return {(): None}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``[..., K]`` → ``[..., N]`` in the layer's dtype (see the class docstring for the two paths)."""
        active = [a for a in self.active_adapters if a in self.lora_A]
        if args or kwargs or not active or not self._folds(x, active):
            return super().forward(x, *args, **kwargs)
        base: SVDQuantLinear = self.get_base_layer()
        downs, ups = [base.lora_down], [base.lora_up]
        for a in active:
            down, up = branch_columns(base, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], False)
            downs.append(down)
            ups.append(up)
        x2 = x.reshape(-1, base.in_features).to(base.wscales.dtype)
        y = base.with_branch(x2, torch.cat(downs, 1), torch.cat(ups, 1))  # W4A4 or weight-only, one kernel call
        return y.reshape(*x.shape[:-1], base.out_features)

    def _folds(self, x: torch.Tensor, active: list[str]) -> bool:
        # The per-call fold needs: CPU (the CUDA path caches packed weights by pointer, and its 16-bit matmuls are
        # fast anyway), no merged or disabled state, no gradient wanted (the op has no backward for the branch), no
        # dropout at work and no lora_bias.
        if x.device.type != "cpu" or self.disable_adapters or self.merged:
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for a in active for p in (*self.lora_A[a].parameters(),
                                                                             *self.lora_B[a].parameters()))
        ):  # fmt: skip
            return False
        if self.training and not all(isinstance(self.lora_dropout[a], nn.Identity) for a in active):
            return False
        return not any(self.lora_bias.get(a) for a in active)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append the adapters (default: the active ones) to the base layer's low-rank branch.

        ``safe_merge`` is accepted for PEFT's signature: the appended columns are always checked to be finite
        before the layer changes (a NaN adapter raises ``ValueError`` and leaves the layer as it was).
        """
        base: SVDQuantLinear = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            if self.lora_bias.get(name):
                raise ValueError(f"svdquant: merging a LoRA with lora_bias=True into {self._where()} is not supported")
            down, up = branch_columns(base, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
            append_branch(base, name, down, up)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Remove every merged adapter's columns from the base layer's branch, newest first (bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base: SVDQuantLinear = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            removed = remove_branch(base)
            if removed != name:
                raise RuntimeError(f"svdquant: {self._where()} unmerged {removed!r} while expecting {name!r}")

    def __repr__(self) -> str:
        return "svdquant." + super().__repr__()


def _create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, SVDQuantLinear) and kwargs.get("parameter_name") is None:
        kwargs.pop("parameter_name", None)
        return SVDQuantLoraLinear(target, adapter_name, config=lora_config, **kwargs)
    return _create_new_module.peft(lora_config, adapter_name, target, **kwargs)


# PEFT's own dispatch, kept for every other layer (unwrapped if this module is ever imported twice).
_create_new_module.peft = getattr(LoraModel._create_new_module, "peft", LoraModel._create_new_module)


def register_peft() -> None:
    """Route PEFT's LoRA layer creation for :class:`SVDQuantLinear` targets to :class:`SVDQuantLoraLinear`.

    Idempotent; run on ``import diffusers_svdquant``. Other layer types keep PEFT's dispatch.
    """
    LoraModel._create_new_module = staticmethod(_create_new_module)
