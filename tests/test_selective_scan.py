"""selective_scan_ref (loop), selective_scan_torch (doubling scan) and selective_scan_fn on every backend."""
import pytest
import torch

from conftest import BACKENDS, assert_close, require_backend
from memorymamba.ops import selective_scan_fn, selective_scan_ref, selective_scan_torch

# (batch, dim, L, N, B_kind, C_kind, D, z, delta_bias, softplus); a kind is "const" (dim, N),
# "g1" (batch, N, L) or an int G for (batch, G, N, L).
CASES = [
    (2, 4, 13, 3, 2, 2, True, True, True, True),
    (1, 3, 7, 1, "const", "const", False, False, False, False),
    (2, 6, 1, 3, 3, 3, True, False, True, True),
    (1, 2, 7, 1, "g1", 1, True, True, False, False),
    (2, 4, 13, 1, "const", 2, False, True, True, True),
    (1, 2, 37, 2, 1, "const", True, False, True, True),
]


def _ids(case):
    b, d, L, N, bk, ck, D, z, db, sp = case
    return f"b{b}-d{d}-L{L}-N{N}-B{bk}-C{ck}" + "-D" * D + "-z" * z + "-bias" * db + "-softplus" * sp


def make_inputs(batch, dim, L, N, B_kind, C_kind, has_D, has_z, has_bias, softplus, dtype=torch.float64,
                device="cpu", param_dtype=None):
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    act = dict(dtype=dtype, device=device)
    par = dict(dtype=param_dtype, device=device)

    def bc(kind):
        if kind == "const":
            return torch.randn(dim, N, **act)
        if kind == "g1":
            return torch.randn(batch, N, L, **act)
        return torch.randn(batch, kind, N, L, **act)

    u = torch.randn(batch, dim, L, **act)
    # Without softplus delta is used as is: keep it positive so the state decays as in a real model.
    delta = 0.5 * torch.randn(batch, dim, L, **act) if softplus else 0.05 + 0.5 * torch.rand(batch, dim, L, **act)
    A = -(0.1 + 1.4 * torch.rand(dim, N, **par))
    return dict(u=u, delta=delta, A=A, B=bc(B_kind), C=bc(C_kind),
                D=torch.randn(dim, **par) if has_D else None,
                z=torch.randn(batch, dim, L, **act) if has_z else None,
                delta_bias=0.3 * torch.randn(dim, **par) if has_bias else None,
                delta_softplus=softplus)


def _grad_names(inputs):
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("impl", [selective_scan_ref, selective_scan_torch], ids=["ref", "torch"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradcheck_float64(impl, case):
    inputs = make_inputs(*case)
    names = _grad_names(inputs)

    def f(*tensors):
        out, last = impl(**{**inputs, **dict(zip(names, tensors))}, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, [inputs[k].requires_grad_() for k in names])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES + [(2, 5, 100, 2, 1, 1, True, True, True, True)], ids=_ids)
def test_matches_loop_reference_fp32(backend, case):
    device = require_backend(backend, "selective_scan")
    inputs = make_inputs(*case, dtype=torch.float32, device=device)
    names = _grad_names(inputs)
    for k in names:
        inputs[k].requires_grad_()
    out, last = selective_scan_fn(**inputs, return_last_state=True, backend=backend)
    ref_inputs = {k: (v.detach().cpu().requires_grad_() if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
    out_ref, last_ref = selective_scan_ref(**ref_inputs, return_last_state=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert last.shape == (case[0], case[1], case[3])
    assert_close("out", out, out_ref, rtol=1e-4, atol=1e-5)
    assert_close("last_state", last, last_ref, rtol=1e-4, atol=1e-5)
    # The kernels follow mamba_ssm, whose last_state is not differentiable; the torch scan's is.
    if backend == "torch":
        assert last.requires_grad
    n_outs = 2 if last.requires_grad else 1
    g_outs = (torch.randn_like(out_ref), torch.randn_like(last_ref))[:n_outs]
    grads = torch.autograd.grad((out, last)[:n_outs], [inputs[k] for k in names], [g.to(device) for g in g_outs])
    grads_ref = torch.autograd.grad((out_ref, last_ref)[:n_outs], [ref_inputs[k] for k in names], g_outs)
    for k, g, g_ref in zip(names, grads, grads_ref):
        assert_close(f"grad {k}", g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_2x_of_torch_reference(backend, dtype):
    """Error vs the fp32 reference at most 2x the error of the same-dtype loop reference."""
    device = require_backend(backend, "selective_scan")
    inputs = make_inputs(2, 6, 37, 3, 2, 2, True, True, True, True, dtype=dtype, device=device)
    exact = selective_scan_ref(**{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    same_dtype_ref = selective_scan_ref(**inputs)
    out = selective_scan_fn(**inputs, backend=backend)
    assert out.dtype == dtype
    ref_err = (same_dtype_ref.float() - exact).abs().max().item()
    err = (out.float() - exact).abs().max().item()
    print(f"{dtype}: backend {backend} max err {err:.3e}, same-dtype reference max err {ref_err:.3e}")
    assert ref_err > 0
    assert err <= 2 * ref_err


def test_fp32_B_C_with_half_u_accepted():
    inputs = make_inputs(1, 4, 9, 2, 2, "const", True, False, False, True, dtype=torch.bfloat16)
    inputs["B"], inputs["C"] = inputs["B"].float(), inputs["C"].float()
    out = selective_scan_fn(**inputs, backend="torch")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 9)


def test_fast_scan_handles_long_sequences_without_overflow():
    """Strong decay over a long sequence: products of decays underflow to 0, never inf/nan."""
    inputs = make_inputs(1, 2, 3001, 1, 1, 1, False, False, False, False, dtype=torch.float32)
    inputs["A"] = torch.full_like(inputs["A"], -30.0)
    inputs["delta"] = inputs["delta"] + 1.0
    out = selective_scan_torch(**inputs)
    ref = selective_scan_ref(**inputs)
    assert torch.isfinite(out).all()
    assert_close("out", out, ref, rtol=1e-4, atol=1e-5)


def _bad(**changes):
    inputs = make_inputs(2, 4, 5, 3, 2, 2, True, True, True, True, dtype=torch.float32)
    for k, v in changes.items():
        inputs[k] = v(inputs) if callable(v) else v
    return inputs


BAD = [
    ("u rank", dict(u=lambda i: i["u"][0]), ValueError, "u must have rank 3"),
    ("u type", dict(u=[1.0]), TypeError, "u must be a torch.Tensor"),
    ("u int dtype", dict(u=lambda i: i["u"].long()), TypeError, "u must have dtype"),
    ("delta shape", dict(delta=lambda i: i["delta"][..., :4]), ValueError, "delta must have shape (batch, dim, L) = (2, 4, 5), got (2, 4, 4)"),
    ("delta dtype", dict(delta=lambda i: i["delta"].half()), TypeError, "delta must have u's dtype"),
    ("A shape", dict(A=lambda i: i["A"][:3]), ValueError, "A must have shape (dim, N)"),
    ("A dtype", dict(A=lambda i: i["A"].half()), TypeError, "A must have dtype"),
    ("A complex", dict(A=lambda i: torch.complex(i["A"], i["A"])), TypeError, "A must have dtype"),
    ("B groups", dict(B=lambda i: torch.randn(2, 3, 3, 5)), ValueError, "B has G = 3 groups, which must divide dim = 4"),
    ("C length", dict(C=lambda i: i["C"][..., :4]), ValueError, "C must have shape (batch, G, N, L)"),
    ("C rank", dict(C=lambda i: i["C"][None]), ValueError, "C must have rank 2 (dim, N), 3 (batch, N, L) or 4"),
    ("B const shape", dict(B=lambda i: torch.randn(4, 2)), ValueError, "B must have shape (dim, N) when constant"),
    ("B N mismatch", dict(B=lambda i: torch.randn(2, 2, 5)), ValueError, "B must have shape (batch, N, L) when variable with one group = (2, 3, 5), got (2, 2, 5)"),
    ("D shape", dict(D=lambda i: i["D"][:2]), ValueError, "D must have shape (dim,) = (4,), got (2,)"),
    ("z shape", dict(z=lambda i: i["z"][:1]), ValueError, "z must have shape (batch, dim, L)"),
    ("delta_bias shape", dict(delta_bias=lambda i: i["delta_bias"][None]), ValueError, "delta_bias must have shape (dim,)"),
    ("N too large", dict(A=lambda i: -torch.rand(4, 257), B=lambda i: torch.randn(4, 257), C=lambda i: torch.randn(4, 257)),
     ValueError, "supports N <= 256"),
]


@pytest.mark.parametrize("changes,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(changes, error, message):
    with pytest.raises(error) as info:
        selective_scan_fn(**_bad(**changes), backend="torch")
    assert message in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Views sliced out of larger tensors (non-unit last stride, offsets) give the contiguous result."""
    device = require_backend(backend, "selective_scan")
    inputs = make_inputs(2, 4, 11, 2, 2, 2, True, True, True, True, dtype=torch.float32, device=device)
    strided = dict(inputs)
    for k in ("u", "delta", "z"):
        big = torch.randn(*inputs[k].shape[:-1], 2 * inputs[k].shape[-1] + 1, device=device)
        big[..., 1::2] = inputs[k]
        strided[k] = big[..., 1::2]
    for k in ("B", "C"):
        big = torch.randn(inputs[k].shape[0], inputs[k].shape[1] + 1, *inputs[k].shape[2:], device=device)
        big[:, 1:] = inputs[k]
        strided[k] = big[:, 1:]
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    # Not bitwise: PyTorch's elementwise kernels take other SIMD paths on strided views (1 ulp).
    assert_close("out", selective_scan_fn(**strided, backend=backend), selective_scan_fn(**inputs, backend=backend),
                 rtol=1e-6, atol=1e-6)
