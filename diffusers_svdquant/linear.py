"""`SVDQuantLinear`: the module that replaces an ``nn.Linear`` in a quantized model."""

from __future__ import annotations

import torch
from torch import nn

from . import algorithm, ops, reference

# The canonical tensors, in the order docs/design.md §2 lists them; bias is separate (optional).
QUANT_TENSORS = ("qweight", "wscales", "smooth", "lora_down", "lora_up")


def canonical_shapes(
    in_features: int, out_features: int, rank: int, bias: bool, weight_only: bool = False
) -> dict[str, tuple[int, ...]]:
    """The shape of each canonical tensor of a ``[out_features, in_features]`` layer (docs/design.md §2),
    ``bias`` included when the layer has one, ``wmins`` when it is weight-only (W4A16): what a checkpoint
    must hold for it."""
    k, n = in_features, out_features
    shapes = {
        "qweight": (n, k // 2),
        "wscales": (n, k // reference.GROUP_SIZE),
        "smooth": (k,),
        "lora_down": (k, rank),
        "lora_up": (n, rank),
    }
    if weight_only:
        shapes["wmins"] = shapes["wscales"]
    return shapes | ({"bias": (n,)} if bias else {})


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class SVDQuantLinear(nn.Module):
    """A linear layer stored as SVDQuant W4A4 + a 16-bit low-rank branch.

    ``y = W4A4(x / smooth) + (x / smooth) @ lora_down @ lora_up.T + bias``, with the tensors of
    docs/design.md §2 as frozen parameters (so they move with ``.to()`` and load/save by name):

    * ``qweight`` uint8 ``[N, K/2]``, ``wscales`` ``[N, K/64]``, ``smooth`` ``[K]``,
      ``lora_down`` ``[K, r]``, ``lora_up`` ``[N, r]``, ``bias`` ``[N]`` (when ``bias=True``).

    Input ``[..., K]`` is cast to the layer's dtype; output is ``[..., N]`` in that dtype.

    :class:`W4A16Linear`, the weight-only kind, is a subclass: ``isinstance(m, SVDQuantLinear)`` finds
    every quantized layer.

    Args:
        in_features: K, a multiple of 64.
        out_features: N.
        rank: r, ``0 <= r <= min(N, K)`` (0: no low-rank branch).
        bias: whether the layer has a bias.
        dtype: model dtype of the float tensors.
        device: where to allocate (``"meta"`` for a skeleton that loading fills in).
    """

    #: The canonical tensors of this kind of layer, bias excluded (docs/design.md §2).
    QUANT_TENSORS: tuple[str, ...] = QUANT_TENSORS
    WEIGHT_ONLY = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        g = reference.GROUP_SIZE
        if in_features % g:
            raise ValueError(f"SVDQuantLinear: in_features={in_features} is not a multiple of {g}")
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"SVDQuantLinear: rank {rank} must be between 0 and min(in, out) = "
                f"{min(in_features, out_features)} for a [{out_features}, {in_features}] layer"
            )
        dtype = dtype or torch.get_default_dtype()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        shapes = canonical_shapes(in_features, out_features, rank, bias, self.WEIGHT_ONLY)
        f = {"dtype": dtype, "device": device}
        # A float tensor is registered first: diffusers reads a module's dtype as
        # next(module.parameters()).dtype (Wan's time embedder casts the timestep to it), and uint8 codes
        # there would turn the timestep into garbage without an error.
        self.wscales = _frozen(torch.zeros(shapes["wscales"], **f))
        self.qweight = _frozen(torch.zeros(shapes["qweight"], dtype=torch.uint8, device=device))
        self.smooth = _frozen(torch.ones(shapes["smooth"], **f))
        self.lora_down = _frozen(torch.zeros(shapes["lora_down"], **f))
        self.lora_up = _frozen(torch.zeros(shapes["lora_up"], **f))
        if self.WEIGHT_ONLY:
            self.wmins = _frozen(torch.zeros(shapes["wmins"], **f))
        self.bias = _frozen(torch.zeros(shapes["bias"], **f)) if bias else None
        # The CUDA GEMM's mma-fragment layout of the tensors above (ops.pack_mma_weights), rebuilt when
        # any of them changes (load_state_dict, .to(), load_quantized). A plain attribute: never in the
        # state dict. (The CPU kernels read the canonical tensors directly: no copy there.)
        self._mma_packed: tuple[tuple, ops.MmaPackedWeights] | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        *,
        act_absmax: torch.Tensor | None = None,
        smoothing_alpha: float = 0.5,
        smoothing_beta: float | None = None,
        svd_method: str = "auto",
        lowrank_iters: int = 0,
        dtype: torch.dtype | None = None,
        hessian: torch.Tensor | None = None,
        hessian_rows: int | None = None,
        scale_search: bool = True,
    ) -> SVDQuantLinear:
        """Quantize an ``nn.Linear`` (weight ``[N, K]``).

        Args:
            linear: the layer; its weight dtype is the model dtype unless ``dtype`` is given.
            rank: low-rank branch rank.
            act_absmax: ``[K]`` per-input-channel absmax of the layer's input (calibration), or None.
            smoothing_alpha, smoothing_beta: ``λ_j = max|X_j|^α / max|W_j|^β`` (β = 1 − α when None).
            svd_method, lowrank_iters: see :class:`~diffusers_svdquant.SVDQuantConfig`.
            dtype: model dtype of the float tensors.
            hessian: ``[K, K]`` ``XᵀX`` of the layer's calibration inputs: GPTQ rounding of the residual.
            hessian_rows: the input rows ``hessian`` sums (GPTQ's damping).
            scale_search: see :class:`~diffusers_svdquant.SVDQuantConfig`.
        """
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, dtype, w.device)
        # The class decides the kind: W4A16Linear.from_linear quantizes weight-only.
        layer.load_quantized(
            algorithm.svdquant_weight(
                w,
                rank,
                act_absmax=act_absmax,
                smoothing_alpha=smoothing_alpha,
                smoothing_beta=smoothing_beta,
                dtype=dtype,
                svd_method=svd_method,
                lowrank_iters=lowrank_iters,
                hessian=hessian,
                weight_only=cls.WEIGHT_ONLY,
                hessian_rows=hessian_rows,
                scale_search=scale_search,
            ),
            None if linear.bias is None else linear.bias.detach().to(dtype),
        )
        return layer

    def load_quantized(self, q: algorithm.QuantizedWeight, bias: torch.Tensor | None) -> None:
        """Replace this layer's tensors with ``q`` (and ``bias``), on ``q``'s device."""
        if (q.wmins is not None) != self.WEIGHT_ONLY:
            kind = "weight-only (W4A16)" if self.WEIGHT_ONLY else "W4A4"
            raise ValueError(f"{type(self).__name__} is {kind}; the quantized weight given is not")
        for name in self.QUANT_TENSORS:
            setattr(self, name, _frozen(getattr(q, name)))
        if bias is not None:
            self.bias = _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` → ``[..., N]`` in the layer's dtype."""
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input has {shape[-1]} features (shape {tuple(shape)}), "
                f"expected {self.in_features}"
            )
        # The tensors straight from _parameters, and no call that can be saved: after a large layer has flushed
        # the caches every Python-level step costs microseconds (module attribute reads, .to() to the same
        # dtype, the op's dispatch: 0.2 ms of an M = 1 weight-only call, benchmarks/RESULTS.md).
        p = self._parameters
        x2 = x.reshape(-1, self.in_features)
        dtype = p["wscales"].dtype
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        # The CUDA cache is keyed by data pointer, which torch.compile cannot trace: compiled graphs
        # take the canonical op (which runs the same kernels, packing on the fly).
        if not self.WEIGHT_ONLY and x2.is_cuda and ops.cuda_mma_path(x2.device) and not torch.compiler.is_compiling():
            y = ops.svdquant_linear_mma(x2, self.smooth, self.lora_down, self.mma_weights())
        else:
            y = self.with_branch(x2, p["lora_down"], p["lora_up"])
        return y.reshape(*shape[:-1], self.out_features)

    def with_branch(self, x: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor) -> torch.Tensor:
        """This layer's op on 2-D ``x`` ``[M, K]`` (model dtype) with ``lora_down`` ``[K, r']`` / ``lora_up``
        ``[N, r']`` as the low-rank branch instead of its own: how unfused LoRAs run inside the same kernel
        call (``integrations.peft``). Returns ``[M, N]``."""
        return ops.svdquant_linear(x, self.qweight, self.wscales, self.smooth, lora_down, lora_up, self.bias)

    def mma_weights(self) -> ops.MmaPackedWeights:
        """The weights in the CUDA GEMM layout (:func:`ops.pack_mma_weights`), repacked when they changed."""
        tensors = (self.qweight, self.wscales, self.lora_up, self.bias)
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        cached = getattr(self, "_mma_packed", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._mma_packed = (key, ops.pack_mma_weights(*tensors))
        return cached[1]

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[N, K]`` weight this layer computes with (up to activation quantization)."""
        tensors = {n: getattr(self, n) for n in self.QUANT_TENSORS}
        return algorithm.dequantize_weight(algorithm.QuantizedWeight(**tensors))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, dtype={self.wscales.dtype}"
        )


class W4A16Linear(SVDQuantLinear):
    """A weight-only INT4 linear: 16-bit activations times 4-bit weights, plus the 16-bit low-rank branch.

    ``y = (x / smooth) @ Wᵀ + (x / smooth) @ lora_down @ lora_up.T + bias`` with ``W = q · wscales + wmins``
    per group of 64 along K (unsigned codes, ``reference.quantize_groups_affine``). For layers whose
    activations do not take 4 bits well or that see few tokens (FLUX's AdaLN modulation, text encoders):
    no activation quantization, and the weights are read once per call, 3.5x fewer bytes than 16-bit.

    Tensors: those of :class:`SVDQuantLinear` (``qweight`` then holds unsigned codes) and ``wmins``
    ``[N, K/64]`` in the model dtype. ``smooth`` is the activation-aware scale from calibration (ones
    without). Arguments as for :class:`SVDQuantLinear`.
    """

    QUANT_TENSORS: tuple[str, ...] = (*QUANT_TENSORS, "wmins")
    WEIGHT_ONLY = True

    def with_branch(self, x: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor) -> torch.Tensor:
        """:meth:`SVDQuantLinear.with_branch` through the weight-only op; in eager CPU inference its CPU
        implementation directly (``ops.weight_only.linear_w4a16_cpu``: the same kernels without the op's dispatch)."""
        p = self._parameters  # not self.qweight, ...: module attribute reads cost microseconds each when cold
        args = (x, p["qweight"], p["wscales"], p["wmins"], p["smooth"], lora_down, lora_up, p.get("bias"))
        if ops.weight_only.eager_on_cpu(x):
            return ops.weight_only.linear_w4a16_cpu(*args)
        return ops.linear_w4a16(*args)

    def mma_weights(self) -> ops.MmaPackedWeights:
        """Not used: the W4A16 kernels read the canonical tensors."""
        raise TypeError("W4A16Linear has no W4A4 mma layout")
