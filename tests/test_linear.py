"""``SVDQuantLinear``: construction from ``nn.Linear``, forward shapes/dtypes/accuracy, errors,
``.to()``, state_dict layout and reload, ``dequantized_weight``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_svdquant import SVDQuantLinear, W4A16Linear, algorithm, ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEYS = ["qweight", "wscales", "smooth", "lora_down", "lora_up"]

# Relative output error vs the nn.Linear it came from (default nn.Linear init, Gaussian input,
# rank 16, no smoothing): measured 0.077-0.149 over every dtype / bias / shape / leading shape here
# (the largest for a single token); ~1.7x margin.
OUTPUT_REL_ERR = 0.25
# Relative error of dequantized_weight() vs the original weight (256 -> 96, rank 16): measured 0.078
# without smoothing and 0.143 with λ from random statistics in [0.1, 10.1] (smoothing moves
# quantization difficulty into the weight); ~1.5x margin.
WEIGHT_REL_ERR = {False: 0.12, True: 0.22}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(k: int, n: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if bias:
        with torch.no_grad():
            lin.bias.normal_(0, 0.5)  # large enough that a dropped bias fails the error bound
    return lin.to(dtype)


def structured_linear(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    """An nn.Linear whose weight has singular values ∝ 1/i and three outlier input columns."""
    g = _gen(seed)
    p = min(n, k)
    u, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, p, generator=g, dtype=torch.float64))
    w = (u / torch.arange(1, p + 1, dtype=torch.float64)) @ v.t()
    w[:, :3] *= 8
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w / w.std() * 0.02)
    return lin.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("k", "n"), [(128, 96), (256, 320)])
def test_from_linear_forward(k, n, bias, dtype):
    """Output shape [..., N] for 1-D to 4-D input, the layer's dtype, and relative error vs the
    original nn.Linear below OUTPUT_REL_ERR; the parameters follow docs/design.md §2."""
    lin = _linear(k, n, bias, dtype)
    q = SVDQuantLinear.from_linear(lin, 16)
    assert (q.in_features, q.out_features, q.rank) == (k, n, 16)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (n, k // 2)
    assert q.wscales.dtype == dtype and q.wscales.shape == (n, k // 64)
    assert (q.bias is not None) == bias
    if bias:
        assert torch.equal(q.bias, lin.bias.detach())
    g = _gen(1)
    for lead in [(), (7,), (2, 5), (2, 3, 4)]:
        x = torch.randn(*lead, k, generator=g).to(dtype)
        y = q(x)
        assert y.shape == (*lead, n)
        assert y.dtype == dtype
        with torch.no_grad():
            ref = lin(x)
        err = rel(y, ref)
        assert err < OUTPUT_REL_ERR, (lead, err)


def test_forward_casts_input_to_layer_dtype():
    """float32 input to a bfloat16 layer gives bfloat16 output equal to feeding bf16 input."""
    q = SVDQuantLinear.from_linear(_linear(128, 64, True, torch.bfloat16), 8)
    x = torch.randn(3, 128, generator=_gen(2))
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, q(x.to(torch.bfloat16)))


def test_forward_empty_batch():
    """Zero tokens in, zero tokens out, with the right trailing shape."""
    q = SVDQuantLinear.from_linear(_linear(128, 64, True, torch.float32), 8)
    assert q(torch.randn(0, 128)).shape == (0, 64)
    assert q(torch.randn(2, 0, 128)).shape == (2, 0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_error_decreases_with_rank(dtype):
    """On a weight with a decaying spectrum, output error falls strictly over r = 0, 8, 16, 32, 64
    (measured 0.246 → 0.027 → 0.018 → 0.012 → 0.007 at 128 → 192, every dtype)."""
    lin = structured_linear(128, 192, dtype, seed=3)
    x = torch.randn(32, 128, generator=_gen(4)).to(dtype)
    with torch.no_grad():
        ref = lin(x)
    errs = [rel(SVDQuantLinear.from_linear(lin, r)(x), ref) for r in (0, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(errs[:-1], errs[1:], strict=True)), errs
    assert errs[-1] < errs[0] / 4, errs


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("features", [127, 64, 256])
def test_wrong_feature_count(lead, features):
    """Input whose last dim is not in_features → ValueError naming both numbers."""
    q = SVDQuantLinear(128, 64, 4)
    with pytest.raises(ValueError, match=rf"{features} features.*expected 128"):
        q(torch.randn(*lead, features))


@pytest.mark.parametrize("k", [100, 63, 130])
def test_in_features_not_multiple_of_64(k):
    """in_features % 64 != 0 → ValueError at construction (and from_linear) naming it."""
    with pytest.raises(ValueError, match=f"in_features={k}"):
        SVDQuantLinear(k, 64, 4)
    with pytest.raises(ValueError, match=f"in_features={k}"):
        SVDQuantLinear.from_linear(nn.Linear(k, 64), 4)


@pytest.mark.parametrize(("k", "n", "r"), [(128, 32, 33), (64, 128, 65), (128, 64, -1)])
def test_bad_rank(k, n, r):
    """rank > min(in, out) or rank < 0 → ValueError at construction naming rank and shape."""
    with pytest.raises(ValueError, match=rf"rank {r}.*\[{n}, {k}\]"):
        SVDQuantLinear(k, n, r)
    with pytest.raises(ValueError, match=rf"rank {r}"):
        SVDQuantLinear.from_linear(nn.Linear(k, n), r)


@pytest.mark.parametrize("bias", [True, False])
def test_to_dtype_keeps_qweight_uint8(bias):
    """.to(float16) casts every float tensor and leaves qweight uint8 and bit-identical; the moved
    layer runs and returns float16."""
    q = SVDQuantLinear.from_linear(_linear(128, 64, bias, torch.float32), 8)
    qweight = q.qweight.clone()
    q16 = q.to(torch.float16)
    for name in ["wscales", "smooth", "lora_down", "lora_up"] + (["bias"] if bias else []):
        assert getattr(q16, name).dtype == torch.float16, name
    assert q16.qweight.dtype == torch.uint8
    assert torch.equal(q16.qweight, qweight)
    assert q16(torch.randn(2, 128)).dtype == torch.float16
    assert all(not p.requires_grad for p in q16.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys(bias):
    """state_dict holds exactly the canonical tensors of docs/design.md §2 (plus bias when present)."""
    q = SVDQuantLinear.from_linear(_linear(128, 64, bias, torch.bfloat16), 8)
    sd = q.state_dict()
    assert sorted(sd) == sorted(KEYS + (["bias"] if bias else []))
    assert sd["qweight"].dtype == torch.uint8
    assert all(sd[k].dtype == torch.bfloat16 for k in sd if k != "qweight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_load_state_dict_into_skeleton(bias, dtype):
    """A fresh skeleton (zeros, or on the meta device with assign=True) loaded from state_dict gives
    bit-identical outputs; the skeleton alone does not (so the check is not vacuous)."""
    q = SVDQuantLinear.from_linear(_linear(192, 80, bias, dtype, seed=5), 12, act_absmax=torch.rand(192) + 0.5)
    x = torch.randn(4, 192, generator=_gen(6)).to(dtype)
    want = q(x)
    sd = {k: v.clone() for k, v in q.state_dict().items()}

    fresh = SVDQuantLinear(192, 80, 12, bias=bias, dtype=dtype)
    assert not torch.equal(fresh(x), want)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), want)

    meta = SVDQuantLinear(192, 80, 12, bias=bias, dtype=dtype, device="meta")
    meta.load_state_dict(sd, assign=True)
    assert torch.equal(meta(x), want)


def test_load_state_dict_missing_key():
    """A state_dict lacking a canonical tensor does not load strictly."""
    q = SVDQuantLinear.from_linear(_linear(128, 64, True, torch.float32), 8)
    sd = q.state_dict()
    del sd["lora_up"]
    with pytest.raises(RuntimeError, match="lora_up"):
        SVDQuantLinear(128, 64, 8).load_state_dict(sd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_stats", [False, True])
def test_dequantized_weight(dtype, with_stats):
    """dequantized_weight() is float32 [N, K] and close to the original weight (WEIGHT_REL_ERR),
    also with smoothing (it undoes λ)."""
    lin = _linear(256, 96, True, dtype, seed=7)
    a = torch.rand(256, generator=_gen(8)) * 10 + 0.1 if with_stats else None
    q = SVDQuantLinear.from_linear(lin, 16, act_absmax=a)
    w = q.dequantized_weight()
    assert w.dtype == torch.float32 and w.shape == (96, 256)
    err = rel(w, lin.weight.float())
    assert err < WEIGHT_REL_ERR[with_stats], err


def test_dtype_override():
    """from_linear(dtype=...) stores the float tensors in that dtype and runs in it."""
    q = SVDQuantLinear.from_linear(_linear(128, 64, True, torch.float32), 8, dtype=torch.bfloat16)
    assert q.wscales.dtype == q.smooth.dtype == q.lora_up.dtype == q.bias.dtype == torch.bfloat16
    assert q(torch.randn(2, 128)).dtype == torch.bfloat16


def test_a_float_tensor_is_the_first_parameter():
    """diffusers reads a module's dtype as next(module.parameters()).dtype (Wan's time embedder casts the
    timestep to it); the uint8 codes there turned the timestep into garbage without an error."""
    layer = SVDQuantLinear.from_linear(torch.nn.Linear(128, 64).to(torch.bfloat16), 8)
    assert next(layer.parameters()).dtype == torch.bfloat16
    assert next(SVDQuantLinear(128, 64, 8, dtype=torch.float16, device="meta").parameters()).dtype == torch.float16


# W4A16Linear: the weight-only kind. Relative output error vs the nn.Linear (default init, Gaussian input,
# rank 16 or 0, no smoothing): measured 0.043-0.061 here (W4A4: 0.077-0.149); ~1.6x margin.
W4A16_REL_ERR = 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("k", "n", "rank"), [(128, 96, 16), (256, 320, 0)])
def test_w4a16_from_linear_forward(k, n, rank, bias, dtype):
    """Output shape and dtype, the error bound (below W4A4's: activations stay 16-bit), the state dict
    (``wmins`` beside the W4A4 tensors), and the forward equals reference.linear_w4a16 on the same tensors."""
    lin = _linear(k, n, bias, dtype)
    layer = W4A16Linear.from_linear(lin, rank)
    assert sorted(layer.state_dict()) == sorted([*KEYS, "wmins"] + (["bias"] if bias else []))
    assert layer.wmins.shape == layer.wscales.shape == (n, k // 64) and layer.wmins.dtype == dtype
    x = torch.randn(2, 3, k, generator=_gen(1)).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    assert rel(y, lin(x)) < W4A16_REL_ERR
    assert rel(y, SVDQuantLinear.from_linear(lin, rank)(x)) < 0.3  # the same layer, two kinds
    t = [getattr(layer, name) for name in ("qweight", "wscales", "wmins", "smooth", "lora_down", "lora_up")]
    expected = reference.linear_w4a16(x.reshape(-1, k), *t, layer.bias)
    torch.testing.assert_close(y.reshape(-1, n).float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_w4a16_dequantized_weight_is_what_it_computes():
    """``dequantized_weight()`` of a W4A16 layer is the weight its forward multiplies by (no activation
    quantization: equal up to float32 summation order), and ``dequantize_`` gives an nn.Linear of it."""
    lin = _linear(128, 64, True, torch.float32)
    stats = torch.rand(128, generator=_gen(2)) * 10 + 0.1
    layer = W4A16Linear.from_linear(lin, 8, act_absmax=stats)
    x = torch.randn(5, 128, generator=_gen(3))
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_w4a16_backward_reaches_the_input_only():
    """The weight-only op has a backward w.r.t. its input (through the dequantized weight): adapters can train
    on top; the 4-bit tensors are frozen."""
    layer = W4A16Linear.from_linear(_linear(128, 64, True, torch.float32), 8)
    x = torch.randn(4, 128, generator=_gen(4), requires_grad=True)
    g = torch.randn(4, 64, generator=_gen(5))
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in layer.parameters())


def test_w4a16_eager_cpu_path_is_the_op(monkeypatch):
    """In eager CPU inference the layer calls the op's CPU implementation directly (no dispatch) and gets the op's
    result bit for bit; with a gradient to record, or when that path is switched off, it takes the op."""
    from diffusers_svdquant.ops import weight_only

    layer = W4A16Linear.from_linear(_linear(192, 80, True, torch.bfloat16), 8)
    x = torch.randn(3, 192, generator=_gen(6)).bfloat16()
    t = [getattr(layer, n) for n in ("qweight", "wscales", "wmins", "smooth", "lora_down", "lora_up", "bias")]
    calls = []
    direct = weight_only.linear_w4a16_cpu
    monkeypatch.setattr(weight_only, "linear_w4a16_cpu", lambda *a: calls.append(1) or direct(*a))
    with torch.no_grad():
        y = layer(x)
    assert calls and torch.equal(y, ops.linear_w4a16(x, *t))
    assert weight_only.eager_on_cpu(x) and not weight_only.eager_on_cpu(x.requires_grad_())
    calls.clear()
    y = layer(x)  # grad enabled and x requires it: the op, whose backward records
    assert not calls and y.requires_grad and torch.equal(y.detach(), ops.linear_w4a16(x.detach(), *t))
    assert not weight_only.eager_on_cpu(torch.empty(1, 192, device="meta"))


def test_load_quantized_of_the_other_kind_is_refused():
    lin = _linear(128, 64, False, torch.float32)
    w4a4, w4a16 = SVDQuantLinear.from_linear(lin, 8), W4A16Linear.from_linear(lin, 8)
    q = algorithm.quantize_weight(lin.weight, 8)
    with pytest.raises(ValueError, match=r"W4A16Linear is weight-only \(W4A16\); the quantized weight given is not"):
        w4a16.load_quantized(q, None)
    with pytest.raises(ValueError, match="SVDQuantLinear is W4A4"):
        w4a4.load_quantized(algorithm.quantize_weight(lin.weight, 8, weight_only=True), None)


def test_w4a16_is_an_svdquant_layer_and_checks_its_input():
    layer = W4A16Linear(128, 64, 4)
    assert isinstance(layer, SVDQuantLinear) and layer.WEIGHT_ONLY
    with pytest.raises(ValueError, match=r"W4A16Linear: input has 100 features \(shape \(2, 100\)\), expected 128"):
        layer(torch.randn(2, 100))
