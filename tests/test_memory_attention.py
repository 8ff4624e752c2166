"""Memory attention: hand-computed values per similarity, gradients, eps safety, backends, input checks."""
import math

import pytest
import torch

from conftest import BACKENDS, assert_close, require_backend
from memorymamba.ops import SIMILARITIES, memory_attention, memory_attention_ref
from memorymamba.ops.memory_attention import EPS


def _hand(p, similarity):
    """One sample of the tiny case below, in plain Python floats."""
    pre = 0.5 * p[0] - 0.25 * p[1] + 0.1
    g = 0.5 * pre * (1 + math.erf(pre / math.sqrt(2)))
    h = [2.0 * g + 0.3, -1.0 * g - 0.2]
    e = [math.exp(t) for t in h]
    a = [t / sum(e) for t in e]
    v = [a[0] * 3 + a[1] * 1, a[0] * 4 + a[1] * -2]
    diff = [v[0] - p[0], v[1] - p[1]]
    if similarity == "cosine":
        beta = (v[0] * p[0] + v[1] * p[1]) / (math.hypot(*v) * math.hypot(*p))
    elif similarity == "l1":
        beta = -(abs(diff[0]) + abs(diff[1])) / 2
    else:
        beta = -math.sqrt((diff[0] ** 2 + diff[1] ** 2) / 2 + EPS)
    return [beta * v[0], beta * v[1]], h, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_hand_computed_tiny_case(backend, similarity):
    device = require_backend(backend, "memory_attention")
    kw = dict(dtype=torch.float32, device=device)
    p = [[6.0, 8.0], [-1.0, 0.5]]
    w, h, v = memory_attention(torch.tensor(p, **kw), torch.tensor([[0.5, -0.25]], **kw), torch.tensor([0.1], **kw),
                               torch.tensor([[2.0], [-1.0]], **kw), torch.tensor([0.3, -0.2], **kw),
                               torch.tensor([[3.0, 4.0], [1.0, -2.0]], **kw), similarity, backend=backend)
    expected = [_hand(row, similarity) for row in p]
    for name, got, i in (("w", w, 0), ("h", h, 1), ("v", v, 2)):
        assert_close(name, got, torch.tensor([e[i] for e in expected]), rtol=1e-5, atol=1e-6)


def test_cosine_of_parallel_vectors_is_one():
    p = torch.tensor([[6.0, 8.0]])
    memory = torch.tensor([[3.0, 4.0], [3.0, 4.0]])  # every readout is (3, 4), parallel to p
    w, _, v = memory_attention_ref(p, torch.randn(5, 2), torch.randn(5), torch.randn(2, 5), torch.randn(2), memory)
    assert_close("v", v, memory[:1], rtol=1e-6, atol=1e-6)
    assert_close("w", w, v, rtol=1e-6, atol=1e-6)


def _random_inputs(B=3, D=5, Hd=7, m=4, dtype=torch.float64, device="cpu"):
    kw = dict(dtype=dtype, device=device)
    return dict(p=torch.randn(B, D, **kw), w1=torch.randn(Hd, D, **kw) / D ** 0.5, b1=torch.randn(Hd, **kw),
                w2=torch.randn(m, Hd, **kw) / Hd ** 0.5, b2=torch.randn(m, **kw), memory=torch.randn(m, D, **kw))


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_gradcheck_float64(similarity):
    inputs = _random_inputs(B=2, D=3, Hd=4, m=3)
    names = list(inputs)
    assert torch.autograd.gradcheck(lambda *t: memory_attention_ref(*t, similarity=similarity),
                                    [inputs[k].requires_grad_() for k in names])


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_zero_features_give_finite_gradients(similarity):
    """eps-safety: a zero pooled vector (e.g. a blank image after ReLU-like layers) must not give nan."""
    inputs = _random_inputs(dtype=torch.float32)
    inputs["p"][1] = 0.0
    inputs["memory"] = inputs["memory"].requires_grad_()
    p = inputs["p"].requires_grad_()
    w, h, v = memory_attention_ref(**inputs, similarity=similarity)
    (w.sum() + h.sum()).backward()
    assert torch.isfinite(w).all() and torch.isfinite(p.grad).all() and torch.isfinite(inputs["memory"].grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_backend_matches_reference_fp32(backend, similarity):
    device = require_backend(backend, "memory_attention")
    inputs = {k: v.requires_grad_() for k, v in _random_inputs(B=5, D=19, Hd=11, m=6, dtype=torch.float32,
                                                                device=device).items()}
    outs = memory_attention(**inputs, similarity=similarity, backend=backend)
    ref_inputs = {k: v.detach().cpu().requires_grad_() for k, v in inputs.items()}
    refs = memory_attention_ref(**ref_inputs, similarity=similarity)
    for name, o, r in zip("whv", outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert_close(name, o, r, rtol=1e-5, atol=1e-6)
    gs = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(outs, list(inputs.values()), [g.to(device) for g in gs])
    grads_ref = torch.autograd.grad(refs, list(ref_inputs.values()), gs)
    for k, a, b in zip(inputs, grads, grads_ref):
        assert_close(f"grad {k}", a, b, rtol=1e-4, atol=1e-5)


def test_optional_biases_and_output_dtype():
    inputs = _random_inputs(dtype=torch.float32)
    inputs["p"] = inputs["p"].bfloat16()
    w, h, v = memory_attention(**{**inputs, "b1": None, "b2": None}, backend="torch")
    assert (w.dtype, h.dtype, v.dtype) == (torch.bfloat16,) * 3
    assert w.shape == (3, 5) and h.shape == (3, 4) and v.shape == (3, 5)


BAD = [
    ("similarity", dict(similarity="dot"), ValueError, "similarity must be one of ('cosine', 'l1', 'l2'), got 'dot'"),
    ("p rank", dict(p=lambda i: i["p"][0]), ValueError, "p must have shape (B, D)"),
    ("p type", dict(p=[[1.0]]), TypeError, "p must be a torch.Tensor"),
    ("p dtype", dict(p=lambda i: i["p"].long()), TypeError, "p must have dtype"),
    ("w1 D", dict(w1=lambda i: i["w1"][:, :-1]), ValueError, "w1 must have shape (Hd, D) with D = 5"),
    ("b1", dict(b1=lambda i: i["b1"][:-1]), ValueError, "b1 must have shape (Hd,) = (7,), got (6,)"),
    ("w2 Hd", dict(w2=lambda i: i["w2"][:, :-1]), ValueError, "w2 must have shape (m, Hd) with Hd = 7"),
    ("b2", dict(b2=lambda i: i["b2"][None]), ValueError, "b2 must have shape (m,) = (4,)"),
    ("memory m", dict(memory=lambda i: i["memory"][:-1]), ValueError, "memory must have shape (m, D) = (4, 5), got (3, 5)"),
]


@pytest.mark.parametrize("changes,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(changes, error, message):
    inputs = dict(_random_inputs(dtype=torch.float32), similarity="cosine")
    for k, v in changes.items():
        inputs[k] = v(inputs) if callable(v) else v
    with pytest.raises(error) as info:
        memory_attention(**inputs, backend="torch")
    assert message in str(info.value)
