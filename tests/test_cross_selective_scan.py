"""The SS2D core: reference vs an independent per-direction loop, gradients, every backend, the fused
activation (x_shift, silu), input checks."""
import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, assert_close, require_backend
from memorymamba.ops import cross_selective_scan, cross_selective_scan_ref, selective_scan_ref

# (B, D, H, W, R, N, x_proj_bias)
CASES = [(2, 3, 3, 5, 2, 1, True), (1, 4, 5, 3, 1, 3, False), (1, 2, 1, 1, 1, 1, True), (2, 5, 4, 7, 2, 2, True)]


def _ids(c):
    return f"B{c[0]}-D{c[1]}-{c[2]}x{c[3]}-R{c[4]}-N{c[5]}" + "-xbias" * c[6]


def make_inputs(B, D, H, W, R, N, with_bias, dtype=torch.float64, device="cpu", shift=False):
    kw = dict(dtype=dtype, device=device)
    extra = dict(x_shift=0.5 * torch.randn(B, D, **kw)) if shift else {}
    return dict(**extra,
        x=torch.randn(B, D, H, W, **kw),
        x_proj_weight=torch.randn(4, R + 2 * N, D, **kw) / D ** 0.5,
        dt_projs_weight=torch.randn(4, D, R, **kw) / R ** 0.5,
        dt_projs_bias=0.5 * torch.randn(4, D, **kw),
        A_logs=0.5 * torch.randn(4 * D, N, **kw),
        Ds=torch.randn(4 * D, **kw),
        x_proj_bias=torch.randn(4, R + 2 * N, **kw) if with_bias else None,
    )


def per_direction_loop(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, x_proj_bias=None):
    """The SS2D core written from its definition: explicit position orders, one direction at a time."""
    B, D, H, W = x.shape
    N = A_logs.shape[1]
    R = x_proj_weight.shape[1] - 2 * N
    row = [(h, w) for h in range(H) for w in range(W)]
    col = [(h, w) for w in range(W) for h in range(H)]
    y = torch.zeros_like(x)
    for k, order in enumerate([row, col, row[::-1], col[::-1]]):
        hs, ws = torch.tensor([p[0] for p in order]), torch.tensor([p[1] for p in order])
        xs = x[:, :, hs, ws]  # (B, D, L) in this direction's order
        x_dbl = torch.matmul(x_proj_weight[k], xs)
        if x_proj_bias is not None:
            x_dbl = x_dbl + x_proj_bias[k][:, None]
        dts, Bk, Ck = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
        channels = slice(k * D, (k + 1) * D)
        ys = selective_scan_ref(xs, torch.matmul(dt_projs_weight[k], dts), -torch.exp(A_logs[channels]), Bk, Ck,
                                D=Ds[channels], delta_bias=dt_projs_bias[k], delta_softplus=True)
        y[:, :, hs, ws] += ys
    return y


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_per_direction_loop(case):
    inputs = make_inputs(*case)
    assert_close("y", cross_selective_scan_ref(**inputs), per_direction_loop(**inputs), rtol=1e-10, atol=1e-10)


# (x_shift given, silu): the block's memory add and SiLU folded into the op.
ACTS = [(False, False), (True, False), (False, True), (True, True)]


def _act_id(act):
    return {(False, False): "plain", (True, False): "shift", (False, True): "silu", (True, True): "shift+silu"}[act]


@pytest.mark.parametrize("act", ACTS[1:], ids=_act_id)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_activation_is_the_op_on_u(case, act):
    """x_shift / silu compute the op on u = act(x + x_shift) (u made here by hand)."""
    inputs = make_inputs(*case, shift=act[0])
    shift = inputs.pop("x_shift", None)
    u = inputs["x"] + (shift[:, :, None, None] if shift is not None else 0)
    u = F.silu(u) if act[1] else u
    assert_close("y", cross_selective_scan_ref(**inputs, x_shift=shift, silu=act[1]),
                 cross_selective_scan_ref(**{**inputs, "x": u}), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
@pytest.mark.parametrize("case", [(2, 3, 3, 5, 2, 1, True), (1, 2, 5, 3, 1, 3, False), (1, 2, 1, 1, 1, 1, True)],
                         ids=_ids)
def test_gradcheck_float64(case, act):
    inputs = make_inputs(*case, shift=act[0])
    names = [k for k, v in inputs.items() if v is not None]

    def f(*tensors):
        return cross_selective_scan_ref(**{**inputs, **dict(zip(names, tensors))}, silu=act[1])

    assert torch.autograd.gradcheck(f, [inputs[k].requires_grad_() for k in names])


@pytest.mark.parametrize("act", [(False, False), (True, True), (True, False)], ids=_act_id)
def test_torch_backend_gradcheck_float64(act):
    inputs = make_inputs(1, 2, 5, 3, 1, 2, True, shift=act[0])
    names = [k for k, v in inputs.items() if v is not None]

    def f(*tensors):
        return cross_selective_scan(**{**inputs, **dict(zip(names, tensors))}, silu=act[1], backend="torch")

    assert torch.autograd.gradcheck(f, [inputs[k].requires_grad_() for k in names])


@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backend_matches_reference_fp32(backend, case, act):
    device = require_backend(backend, "cross_selective_scan")
    inputs = make_inputs(*case, dtype=torch.float32, device=device, shift=act[0])
    names = [k for k, v in inputs.items() if v is not None]
    for k in names:
        inputs[k].requires_grad_()
    y = cross_selective_scan(**inputs, silu=act[1], backend=backend)
    ref_inputs = {k: (v.detach().cpu().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y_ref = cross_selective_scan_ref(**ref_inputs, silu=act[1])
    assert y.shape == case[:4] and y.dtype == torch.float32
    assert_close("y", y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [inputs[k] for k in names], g.to(device))
    grads_ref = torch.autograd.grad(y_ref, [ref_inputs[k] for k in names], g)
    for k, a, b in zip(names, grads, grads_ref):
        assert_close(f"grad {k}", a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
def test_output_has_x_dtype(act):
    inputs = make_inputs(1, 3, 3, 4, 1, 1, True, dtype=torch.float32, shift=act[0])
    inputs["x"] = inputs["x"].bfloat16().requires_grad_()
    y = cross_selective_scan(**inputs, silu=act[1], backend="torch")
    assert y.dtype == torch.bfloat16 and y.shape == (1, 3, 3, 4)
    y.float().sum().backward()
    assert inputs["x"].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_the_ops_precision(backend):
    # Under autocast the op must compute exactly as outside it (fp32 maths, y in x's dtype), and so
    # must its backward, run outside the region as autocast's docs ask.
    device = require_backend(backend, "cross_selective_scan")
    inputs = make_inputs(2, 3, 3, 5, 2, 1, True, dtype=torch.float32, device=device, shift=True)
    names = [k for k, v in inputs.items() if v is not None]
    for k in names:
        inputs[k].requires_grad_()
    y = cross_selective_scan(**inputs, silu=True, backend=backend)
    grads = torch.autograd.grad(y.sum(), [inputs[k] for k in names])
    dev = torch.device(device).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        y_ac = cross_selective_scan(**inputs, silu=True, backend=backend)
    grads_ac = torch.autograd.grad(y_ac.sum(), [inputs[k] for k in names])
    assert y_ac.dtype == torch.float32
    assert_close("y under autocast", y_ac, y, rtol=1e-6, atol=1e-6)
    for k, a, b in zip(names, grads_ac, grads):
        assert_close(f"grad {k} under autocast", a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_parameter_views(backend):
    # Parameters that are non-contiguous views (a slice of a larger tensor) work like their copies.
    device = require_backend(backend, "cross_selective_scan")
    inputs = make_inputs(2, 3, 3, 5, 2, 1, True, dtype=torch.float32, device=device, shift=True)
    wide = torch.randn(4, 2 * (2 + 2), 3, device=device)[:, ::2]
    assert not wide.is_contiguous()
    inputs["x_proj_weight"] = wide
    y = cross_selective_scan(**inputs, silu=True, backend=backend)
    y_ref = cross_selective_scan_ref(**{k: (v.contiguous().cpu() if v is not None else None) for k, v in inputs.items()},
                                     silu=True)
    assert_close("y with a sliced x_proj_weight", y, y_ref, rtol=1e-4, atol=1e-5)


BAD = [
    ("x rank", dict(x=lambda i: i["x"][0]), ValueError, "x must have shape (B, D, H, W)"),
    ("x dtype", dict(x=lambda i: i["x"].long()), TypeError, "x must have dtype"),
    ("K", dict(x_proj_weight=lambda i: i["x_proj_weight"][:3]), ValueError, "x_proj_weight must have shape (K, R+2N, D) with K = 4"),
    ("R zero", dict(x_proj_weight=lambda i: i["x_proj_weight"][:, :2]), ValueError, "dt rank R >= 1"),
    ("A_logs rows", dict(A_logs=lambda i: i["A_logs"][:-1]), ValueError, "A_logs must have shape (K*D, N) with K*D = 12"),
    ("A_logs N=0", dict(A_logs=lambda i: i["A_logs"][:, :0]), ValueError, "N >= 1"),
    ("x_proj_bias", dict(x_proj_bias=lambda i: i["x_proj_bias"][:, :-1]), ValueError, "x_proj_bias must have shape (K, R+2N) = (4, 4)"),
    ("dt_projs_weight", dict(dt_projs_weight=lambda i: i["dt_projs_weight"][..., :1]), ValueError, "dt_projs_weight must have shape (K, D, R) = (4, 3, 2)"),
    ("dt_projs_bias", dict(dt_projs_bias=lambda i: i["dt_projs_bias"].flatten()), ValueError, "dt_projs_bias must have shape (K, D) = (4, 3)"),
    ("Ds", dict(Ds=lambda i: i["Ds"][:3]), ValueError, "Ds must have shape (K*D,) = (12,)"),
    ("Ds type", dict(Ds=3.0), TypeError, "Ds must be a torch.Tensor"),
    ("x_shift shape", dict(x_shift=lambda i: torch.randn(2, 4)), ValueError,
     "x_shift must have shape (B, D) = (2, 3) (x's batch and channels), got (2, 4)"),
    ("x_shift rank", dict(x_shift=lambda i: torch.randn(2, 3, 1, 1)), ValueError, "x_shift must have shape (B, D)"),
    ("x_shift dtype", dict(x_shift=lambda i: torch.ones(2, 3, dtype=torch.long)), TypeError, "x_shift must have dtype"),
    ("x_shift type", dict(x_shift=0.5), TypeError, "x_shift must be a torch.Tensor"),
    ("x_shift device", dict(x_shift=lambda i: torch.randn(2, 3, device="meta")), ValueError,
     "x_shift must be on x's device cpu, got meta"),
]


@pytest.mark.parametrize("op", ["torch", "ref"])
@pytest.mark.parametrize("changes,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(changes, error, message, op):
    inputs = make_inputs(2, 3, 3, 5, 2, 1, True, dtype=torch.float32)
    for k, v in changes.items():
        inputs[k] = v(inputs) if callable(v) else v
    with pytest.raises(error) as info:
        if op == "ref":
            cross_selective_scan_ref(**inputs)
        else:
            cross_selective_scan(**inputs, backend="torch")
    assert message in str(info.value)
