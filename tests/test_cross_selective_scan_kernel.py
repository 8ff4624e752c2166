"""The fused cross_selective_scan kernels (CPU always; CUDA when a GPU is visible) against the fp32
reference: values, every gradient, dtypes, odd shapes, strided x, poisoned outputs, determinism,
torch.compile. No CUDA call happens at import."""
from __future__ import annotations

import pytest
import torch

from conftest import require_backend
from memorymamba.ops.cross_selective_scan import cross_selective_scan, cross_selective_scan_ref

OP = "cross_selective_scan"


@pytest.fixture(autouse=True)
def _cpu_kernels():
    require_backend("cpu", OP)  # every test here also runs the CPU kernels


@pytest.fixture
def cuda():
    # Checked inside the test, so collecting this file makes no CUDA call.
    require_backend("cuda", OP)

FP32_TOL = dict(rtol=1e-4, atol=1e-5)
PARAM_NAMES = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds", "x_proj_bias")


def make_inputs(B, D, H, W, N, R, *, bias=True, seed=0, device="cpu"):
    """Random SS2D core inputs with VMamba-like magnitudes (delta mostly in 0.01..1)."""
    g = torch.Generator().manual_seed(seed)
    K, C = 4, R + 2 * N
    p = dict(
        x=torch.randn(B, D, H, W, generator=g),
        x_proj_weight=torch.randn(K, C, D, generator=g) / D ** 0.5,
        dt_projs_weight=torch.randn(K, D, R, generator=g) / R ** 0.5,
        dt_projs_bias=torch.randn(K, D, generator=g) * 0.5 - 2.0,
        A_logs=torch.log(torch.rand(K * D, N, generator=g) * 3 + 0.5),
        Ds=torch.randn(K * D, generator=g),
        x_proj_bias=torch.randn(K, C, generator=g) * 0.1 if bias else None,
    )
    return {k: (v.to(device) if v is not None else None) for k, v in p.items()}


def run(fn, inp, dy, dtype=torch.float32, x=None, **kw):
    """y and the gradients of x and every parameter, for x cast to `dtype` (or the given x view)."""
    x = (inp["x"].to(dtype) if x is None else x).detach().requires_grad_(True)
    params = {k: inp[k].detach().clone().requires_grad_(True) for k in PARAM_NAMES if inp[k] is not None}
    y = fn(x, params["x_proj_weight"], params["dt_projs_weight"], params["dt_projs_bias"], params["A_logs"],
           params["Ds"], params.get("x_proj_bias"), **kw)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "x": x.grad, **{k: v.grad for k, v in params.items()}}


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_fp32(out, ref, label):
    for k in ref:
        err = max_err(out[k], ref[k])
        print(f"{label} {k}: max abs err {err:.3e} (|ref| max {ref[k].abs().max().item():.3e})")
        torch.testing.assert_close(out[k].float(), ref[k].float(), **FP32_TOL, msg=lambda m: f"{label} {k}: {m}")


def kernel_fn(backend, **kw):
    return lambda *a, **call_kw: cross_selective_scan(*a, backend=backend, **kw, **call_kw)


SHAPES = [  # (B, D, H, W, N, R, bias)
    (2, 5, 1, 1, 1, 1, True),
    (1, 3, 1, 9, 4, 6, False),
    (2, 4, 9, 1, 1, 6, True),
    (2, 6, 7, 5, 4, 1, True),
    (1, 7, 13, 11, 1, 6, False),
    (3, 8, 6, 6, 4, 6, True),
    (1, 4, 5, 8, 16, 3, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}D{}_{}x{}_N{}R{}_{}".format(*s[:6], "bias" if s[6] else "nobias"))
def test_fp32_values_and_grads(shape):
    B, D, H, W, N, R, bias = shape
    inp = make_inputs(B, D, H, W, N, R, bias=bias, seed=hash(shape) % 1000)
    dy = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(1))
    ref = run(cross_selective_scan_ref, inp, dy)
    out = run(kernel_fn("cpu"), inp, dy)
    assert_close_fp32(out, ref, f"cpu fp32 {shape}")


def test_no_softplus():
    inp = make_inputs(2, 5, 7, 6, 2, 4)
    inp["dt_projs_bias"] = inp["dt_projs_bias"].abs() + 0.5  # positive raw delta without softplus
    inp["dt_projs_weight"] = inp["dt_projs_weight"] * 0.05
    dy = torch.randn(2, 5, 7, 6)
    ref = run(cross_selective_scan_ref, inp, dy, delta_softplus=False)
    out = run(kernel_fn("cpu"), inp, dy, delta_softplus=False)
    assert_close_fp32(out, ref, "cpu no-softplus")


def test_strided_x():
    inp = make_inputs(2, 6, 7, 9, 1, 6)
    big = torch.randn(3, 13, 9, 20)
    x = big[1:, ::2, 1:8, 2:20:2]  # non-contiguous in every dim
    assert x.shape == (2, 7, 7, 9) and not x.is_contiguous()
    x = x[:, :6]
    inp["x"] = x.clone()
    dy = torch.randn(2, 6, 7, 9)
    ref = run(cross_selective_scan_ref, inp, dy)
    out = run(kernel_fn("cpu"), inp, dy, x=x)
    assert_close_fp32(out, ref, "cpu strided")
    x_t = inp["x"].transpose(2, 3).contiguous().transpose(2, 3)  # channels-last-like strides
    out_t = run(kernel_fn("cpu"), inp, dy, x=x_t)
    assert_close_fp32(out_t, ref, "cpu transposed-strides")


def _check_low_precision(device, dtype, shape):
    B, D, H, W, N, R = shape
    inp = make_inputs(B, D, H, W, N, R, seed=7, device=device)
    inp["x"] = inp["x"].to(dtype).float()  # all three runs see the same representable inputs
    dy = torch.randn(B, D, H, W, device=device).to(dtype).float()
    ref32 = run(cross_selective_scan_ref, inp, dy)
    ref_lp = run(cross_selective_scan_ref, inp, dy, dtype=dtype)
    out = run(kernel_fn(device), inp, dy, dtype=dtype)
    for k in ref32:
        assert out[k].dtype == ref_lp[k].dtype, k
        e_out, e_ref = max_err(out[k], ref32[k]), max_err(ref_lp[k], ref32[k])
        scale = ref32[k].abs().max().item()
        # fp32 floor: parameter grads are fp32 in both and differ only by summation order.
        bound = 2 * e_ref + FP32_TOL["atol"] + FP32_TOL["rtol"] * scale
        print(f"{device} {dtype} {k}: kernel err {e_out:.3e}, {dtype} reference err {e_ref:.3e}, bound {bound:.3e}")
        assert e_out <= bound, f"{k}: kernel error {e_out:.3e} > 2 x {dtype} reference error + fp32 floor {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 6, 7, 5, 1, 6), (1, 5, 4, 9, 4, 1)])
def test_low_precision(dtype, shape):
    _check_low_precision("cpu", dtype, shape)


def _bits(out):
    return {k: v.clone() for k, v in out.items()}


def test_deterministic_bitwise():
    inp = make_inputs(3, 8, 11, 9, 4, 6)
    dy = torch.randn(3, 8, 11, 9)
    threads = torch.get_num_threads()
    try:
        a = _bits(run(kernel_fn("cpu", deterministic=True), inp, dy))
        b = _bits(run(kernel_fn("cpu", deterministic=True), inp, dy))
        torch.set_num_threads(1)
        c = _bits(run(kernel_fn("cpu", deterministic=True), inp, dy))
    finally:
        torch.set_num_threads(threads)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between two runs"
        assert torch.equal(a[k], c[k]), f"{k} differs between {threads} threads and 1 thread"


def test_poisoned_outputs_are_overwritten():
    """Call the extension directly with NaN-filled outputs: every element must be written."""
    from memorymamba._backend import extension
    C = extension()
    B, D, H, W, N, R = 2, 5, 7, 3, 2, 3
    inp = make_inputs(B, D, H, W, N, R)
    L, K = H * W, 4
    x = inp["x"]
    x_dbl = torch.einsum("kcd,bdl->bkcl", inp["x_proj_weight"], x.reshape(B, D, L)).contiguous()
    args = (x, x_dbl, inp["dt_projs_weight"], inp["dt_projs_bias"], inp["A_logs"], inp["Ds"])
    y = torch.full_like(x, float("nan"))
    C.cross_selective_scan_fwd(*args, y, True)
    assert not y.isnan().any(), "forward left elements of y unwritten"
    chunks = C.css_cpu_channel_chunks
    outs = [torch.full(s, float("nan")) for s in [(B, D, L), (B, chunks, K, R + 2 * N, L), (B, K, D, R), (B, K, D),
                                                  (B, K, D, N), (B, K, D)]]
    du, dxdbl, dw, db, dA, dD = outs
    C.cross_selective_scan_bwd(*args, torch.randn(B, D, H, W), du, dxdbl, None, dw, db, dA, dD, None, True)
    for name, t in zip(("du", "dxdbl", "ddt_w_part", "ddt_b_part", "dA_logs_part", "dDs_part"), outs):
        assert not t.isnan().any(), f"backward left elements of {name} unwritten"


def test_compile_fullgraph():
    from memorymamba.ops._kernels.cross_selective_scan import cross_selective_scan as fused
    inp = make_inputs(2, 4, 5, 6, 1, 2)
    dy = torch.randn(2, 4, 5, 6)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    out = run(compiled, inp, dy)
    ref = run(kernel_fn("cpu"), inp, dy)
    for k in ref:
        assert torch.equal(out[k], ref[k]), f"compiled {k} differs from eager"


def test_bad_inputs_raise_named_errors():
    inp = make_inputs(1, 4, 3, 3, 17, 2)
    with pytest.raises(ValueError, match="d_state"):
        run(kernel_fn("cpu"), inp, torch.randn(1, 4, 3, 3))
    inp = make_inputs(1, 4, 3, 3, 1, 2)
    with pytest.raises((ValueError, TypeError), match="x"):
        run(kernel_fn("cpu"), inp, torch.randn(1, 4, 3, 3), dtype=torch.float64)
    from memorymamba._backend import extension
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"x_dbl must have shape \(batch, 4, dt_rank \+ 2\*d_state, height\*width\)"):
        extension().cross_selective_scan_fwd(x, torch.randn(1, 4, 4, 8), inp["dt_projs_weight"],
                                             inp["dt_projs_bias"], inp["A_logs"], inp["Ds"], torch.empty_like(x), True)


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:6] + [(2, 16, 40, 37, 1, 6, True)], ids=str)
def test_cuda_fp32(cuda, shape, deterministic):
    B, D, H, W, N, R, bias = shape
    inp = make_inputs(B, D, H, W, N, R, bias=bias, device="cuda")
    dy = torch.randn(B, D, H, W, device="cuda")
    ref = run(kernel_fn("cpu"), {k: (v.cpu() if v is not None else None) for k, v in inp.items()}, dy.cpu())
    out = run(kernel_fn("cuda", deterministic=deterministic), inp, dy)
    assert_close_fp32({k: v.cpu() for k, v in out.items()}, ref, f"cuda fp32 {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(cuda, dtype):
    _check_low_precision("cuda", dtype, (2, 6, 7, 5, 1, 6))


@pytest.mark.gpu
def test_cuda_long_sequence_and_determinism(cuda):
    inp = make_inputs(2, 8, 67, 61, 4, 6, device="cuda")  # L = 4087: several segments
    dy = torch.randn(2, 8, 67, 61, device="cuda")
    a = _bits(run(kernel_fn("cuda", deterministic=True), inp, dy))
    b = _bits(run(kernel_fn("cuda", deterministic=True), inp, dy))
    for k in a:
        assert torch.equal(a[k], b[k]), f"cuda deterministic {k} differs between two runs"
    ref = run(kernel_fn("cpu"), {k: (v.cpu() if v is not None else None) for k, v in inp.items()}, dy.cpu())
    assert_close_fp32({k: v.cpu() for k, v in a.items()}, ref, "cuda long")
