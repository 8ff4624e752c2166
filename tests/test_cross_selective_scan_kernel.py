"""The fused cross_selective_scan kernels (CPU always; CUDA when a GPU is visible) against the fp32
reference: values, every gradient (x_shift's included), the fused activation (x_shift, silu), dtypes,
odd shapes, strided x, poisoned outputs, determinism, torch.compile. No CUDA call happens at import."""
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
PARAM_NAMES = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds", "x_proj_bias", "x_shift")
# The block's activation folded into the op: (x_shift given, silu).
ACTS = [(False, False), (True, False), (False, True), (True, True)]


def _act_id(act):
    return {(False, False): "plain", (True, False): "shift", (False, True): "silu", (True, True): "shift+silu"}[act]


def make_inputs(B, D, H, W, N, R, *, bias=True, seed=0, device="cpu", act=(False, False)):
    """Random SS2D core inputs with VMamba-like magnitudes (delta mostly in 0.01..1). act = (x_shift
    given, silu): with a shift, x_shift is a (B, D) fp32 memory add; the silu flag is returned in
    "silu" for run()."""
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
        x_shift=torch.randn(B, D, generator=g) * 0.5 if act[0] else None,
    )
    return {**{k: (v.to(device) if v is not None else None) for k, v in p.items()}, "silu": act[1]}


def run(fn, inp, dy, dtype=torch.float32, x=None, **kw):
    """y and the gradients of x and every parameter (x_shift's too), for x cast to `dtype` (or the
    given x view)."""
    x = (inp["x"].to(dtype) if x is None else x).detach().requires_grad_(True)
    params = {k: inp[k].detach().clone().requires_grad_(True) for k in PARAM_NAMES if inp.get(k) is not None}
    if params.get("x_shift") is not None or inp.get("silu"):
        kw = dict(kw, x_shift=params.get("x_shift"), silu=inp.get("silu", False))
    y = fn(x, params["x_proj_weight"], params["dt_projs_weight"], params["dt_projs_bias"], params["A_logs"],
           params["Ds"], params.get("x_proj_bias"), **kw)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "x": x.grad, **{k: v.grad for k, v in params.items()}}


def _fp64(inp):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _cpu(inp):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _refs(inp, dy):
    """The PyTorch reference on the CPU in fp64 and in fp32 (for assert_close_fp32's ref32)."""
    inp, dy = _cpu(inp), dy.cpu()
    return run(cross_selective_scan_ref, _fp64(inp), dy.double(), dtype=torch.float64), run(cross_selective_scan_ref, inp, dy)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_fp32(out, ref, label, ref32=None):
    """out against the fp64 reference `ref`, elementwise within FP32_TOL; or, given `ref32` (the fp32
    PyTorch reference), with a largest error at most twice that reference's largest error: the brief's
    rule for fp16/bf16 applied to fp32, for parameter gradients whose sums over B*L positions cancel so
    far on some elements that no fp32 summation order (the reference's included) meets FP32_TOL there."""
    for k in ref:
        got, want = out[k].double(), ref[k].double()
        err = (got - want).abs()
        allowed = FP32_TOL["atol"] + FP32_TOL["rtol"] * want.abs()
        print(f"{label} {k}: max abs err {err.max().item():.3e} (|ref| max {want.abs().max().item():.3e})")
        bad = err > allowed
        if not bad.any():
            continue
        i = int(torch.argmax(torch.where(bad, err / allowed, 0)))
        where = (f"{int(bad.sum())} of {err.numel()} elements off FP32_TOL; worst at flat index {i}: "
                 f"{got.flatten()[i].item():.7g} vs {want.flatten()[i].item():.7g}")
        if ref32 is None:
            raise AssertionError(f"{label} {k}: {where}")
        e_ref = (ref32[k].double() - want).abs().max().item()
        print(f"{label} {k}: {where}; fp32 reference max abs err {e_ref:.3e}")
        assert err.max().item() <= 2 * e_ref, (
            f"{label} {k}: {where}, and the largest error {err.max().item():.3e} > 2 x the fp32 reference's {e_ref:.3e}")


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
    # Several CPU lane groups (16, 8 or 4 channels with AVX-512, AVX2 or neither), the last one
    # partial, split over the backward's channel chunks unevenly; odd L (the forward's two-step loop
    # ends on a single step). B*L stays small: x_proj_weight's gradient sums over B*L positions, and
    # at B*L = 126 some of its elements cancel to ~0.03 from terms of ~250, where any fp32 summation
    # order is off by ~2e-5, above the fp32 tolerance.
    (1, 40, 3, 5, 1, 6, True),
    (1, 33, 5, 5, 4, 3, False),
    (1, 20, 3, 4, 1, 64, True),  # the largest dt_rank
]


@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}D{}_{}x{}_N{}R{}_{}".format(*s[:6], "bias" if s[6] else "nobias"))
def test_fp32_values_and_grads(shape, act):
    B, D, H, W, N, R, bias = shape
    inp = make_inputs(B, D, H, W, N, R, bias=bias, seed=hash(shape) % 1000, act=act)
    dy = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(1))
    # The reference in fp64: an fp32 reference carries rounding errors as large as the kernel's (sums of
    # many terms that cancel), so either could exceed the fp32 tolerance on its own.
    ref = run(cross_selective_scan_ref, _fp64(inp), dy.double(), dtype=torch.float64)
    out = run(kernel_fn("cpu"), inp, dy)
    assert ("x_shift" in out) == act[0]
    assert_close_fp32(out, ref, f"cpu fp32 {shape} {_act_id(act)}")


@pytest.mark.parametrize("shape,act", [((2, 16, 40, 37, 1, 6, True), act) for act in ACTS]
                         + [((2, 8, 67, 61, 4, 6, True), act) for act in [(False, False), (True, True)]],
                         ids=lambda v: _act_id(v) if len(v) == 2 else "B{}D{}_{}x{}_N{}R{}".format(*v[:6]))
def test_fp32_long_sequences(shape, act):
    # L = 1480 and 4087: the parameter gradients sum over B*L positions, where one running fp32 sum
    # (the kernel's before its sums were blocked) was several times less accurate than the fp32
    # reference's blocked sums.
    B, D, H, W, N, R, bias = shape
    inp = make_inputs(B, D, H, W, N, R, bias=bias, act=act)
    dy = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(1))
    ref, ref32 = _refs(inp, dy)
    out = run(kernel_fn("cpu"), inp, dy)
    assert_close_fp32(out, ref, f"cpu fp32 long {shape} {_act_id(act)}", ref32)


@pytest.mark.parametrize("L,block", [(600, 256), (256, 256), (5, 256), (97, 8)])
def test_blocked_weight_grad(L, block):
    """The CUDA path's d(x_proj_weight) GEMM (one bmm per block of positions, a partial last block),
    run on the CPU against the fp64 sum."""
    from memorymamba.ops._kernels.cross_selective_scan import _blocked_weight_grad
    dx_dbl, u = torch.randn(3, 12, L), torch.randn(3, 7, L).transpose(1, 2).contiguous().transpose(1, 2)
    want = torch.einsum("bcl,bdl->cd", dx_dbl.double(), u.double())
    got = _blocked_weight_grad(dx_dbl, u, block)
    assert got.shape == (12, 7)
    torch.testing.assert_close(got.double(), want, **FP32_TOL)


def test_fused_activation_is_the_unfused_pipeline():
    """x_shift and silu in the op compute the op on u = SiLU(x + x_shift) (the block's unfused path)."""
    inp = make_inputs(2, 6, 7, 5, 2, 3, act=(True, True))
    dy = torch.randn(2, 6, 7, 5)
    fused = run(kernel_fn("cpu"), inp, dy)
    x = inp["x"].detach().requires_grad_(True)
    shift = inp["x_shift"].detach().requires_grad_(True)
    u = torch.nn.functional.silu(x + shift[:, :, None, None])
    y = cross_selective_scan(u, *(inp[k] for k in PARAM_NAMES[:6]), backend="cpu")
    y.backward(dy)
    for k, got, want in (("y", fused["y"], y.detach()), ("x", fused["x"], x.grad), ("x_shift", fused["x_shift"], shift.grad)):
        print(f"{k}: max abs err {max_err(got, want):.3e}")
        torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda m: f"{k}: {m}")


def test_no_softplus():
    inp = make_inputs(2, 5, 7, 6, 2, 4)
    inp["dt_projs_bias"] = inp["dt_projs_bias"].abs() + 0.5  # positive raw delta without softplus
    inp["dt_projs_weight"] = inp["dt_projs_weight"] * 0.05
    dy = torch.randn(2, 5, 7, 6)
    ref = run(cross_selective_scan_ref, inp, dy, delta_softplus=False)
    out = run(kernel_fn("cpu"), inp, dy, delta_softplus=False)
    assert_close_fp32(out, ref, "cpu no-softplus")


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
def test_strided_x(act):
    inp = make_inputs(2, 6, 7, 9, 1, 6, act=act)
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


def _check_low_precision(device, dtype, shape, act=(False, False)):
    B, D, H, W, N, R = shape
    inp = make_inputs(B, D, H, W, N, R, seed=7, device=device, act=act)
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


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 6, 7, 5, 1, 6), (1, 5, 4, 9, 4, 1)])
def test_low_precision(dtype, shape, act):
    _check_low_precision("cpu", dtype, shape, act)


def _bits(out):
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
def test_deterministic_bitwise(act):
    # 70 channels: five CPU lane groups (the last partial), one backward channel chunk holding two.
    inp = make_inputs(3, 70, 11, 9, 4, 6, act=act)
    dy = torch.randn(3, 70, 11, 9)
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


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
def test_poisoned_outputs_are_overwritten(act):
    """Call the extension directly with NaN-filled outputs: every element must be written."""
    from memorymamba._backend import extension
    C = extension()
    B, D, H, W, N, R = 2, 5, 7, 3, 2, 3
    inp = make_inputs(B, D, H, W, N, R, act=act)
    L, K, rows = H * W, 4, 4 * (R + 2 * N)
    x, shift, silu = inp["x"], inp["x_shift"], inp["silu"]
    w = inp["x_proj_weight"].reshape(rows, D)
    x_dbl = torch.full((B, rows, L), float("nan"))
    C.cross_selective_scan_proj(x, shift, silu, w, inp["x_proj_bias"].reshape(rows), x_dbl)
    assert not x_dbl.isnan().any(), "projection left elements of x_dbl unwritten"
    x_dbl = x_dbl.view(B, K, R + 2 * N, L)
    args = (x, x_dbl, inp["dt_projs_weight"], inp["dt_projs_bias"], inp["A_logs"], inp["Ds"])
    y = torch.full_like(x, float("nan"))
    C.cross_selective_scan_fwd(*args, y, True, shift, silu)
    assert not y.isnan().any(), "forward left elements of y unwritten"
    chunks = C.css_cpu_channel_chunks
    outs = [torch.full(s, float("nan")) for s in [(B, D, L), (B, chunks, K, R + 2 * N, L), (B, K, D, R), (B, K, D),
                                                  (B, K, D, N), (B, K, D)]]
    du, dxdbl, dw, db, dA, dD = outs
    C.cross_selective_scan_bwd(*args, torch.randn(B, D, H, W), du, dxdbl, None, dw, db, dA, dD, None, True, shift,
                               silu)
    for name, t in zip(("du", "dxdbl", "ddt_w_part", "ddt_b_part", "dA_logs_part", "dDs_part"), outs):
        assert not t.isnan().any(), f"backward left elements of {name} unwritten"
    act_outs = [torch.full_like(x, float("nan")), torch.full((B, D), float("nan")), torch.full((B, rows, D), float("nan"))]
    C.cross_selective_scan_act_bwd(x, shift, silu, torch.randn(B, D, L), act_outs[0], act_outs[1],
                                   torch.randn(B, rows, L), act_outs[2], None)
    for name, t in zip(("dx", "dshift", "dw_part"), act_outs):
        assert not t.isnan().any(), f"activation backward left elements of {name} unwritten"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 1, 3), (1, 3, 1, 1, 2, 1), (3, 40, 19, 23, 1, 6)], ids=str)
def test_projection_kernel(shape, act, dtype):
    """cross_selective_scan_proj (the op's x_proj GEMM with u made on the fly; plain x on CPU uses a
    bmm inside the op, so this is its only CPU test) against matmul on the materialised u, strided x."""
    from memorymamba._backend import extension
    B, D, H, W, N, R = shape
    inp = make_inputs(B, D, H, W, N, R, act=act)
    rows = 4 * (R + 2 * N)
    x = torch.randn(B, D + 2, W, H).to(dtype)[:, 1:-1].transpose(2, 3)  # strided, not contiguous
    w, bias = inp["x_proj_weight"].reshape(rows, D), inp["x_proj_bias"].reshape(rows)
    u = x.float() + (inp["x_shift"][:, :, None, None] if act[0] else 0)
    u = torch.nn.functional.silu(u) if act[1] else u
    ref = torch.einsum("cd,bdl->bcl", w.double(), u.reshape(B, D, H * W).double()) + bias.double()[:, None]
    out = torch.full((B, rows, H * W), float("nan"))
    extension().cross_selective_scan_proj(x, inp["x_shift"], act[1], w, bias, out)
    print(f"proj {shape} {_act_id(act)} {dtype}: max abs err {max_err(out, ref):.3e}")
    torch.testing.assert_close(out.double(), ref, **FP32_TOL)


@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
def test_compile_fullgraph(act):
    from memorymamba.ops._kernels.cross_selective_scan import cross_selective_scan as fused
    inp = make_inputs(2, 4, 5, 6, 1, 2, act=act)
    dy = torch.randn(2, 4, 5, 6)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    out = run(compiled, inp, dy)
    ref = run(kernel_fn("cpu"), inp, dy)
    for k in ref:
        assert torch.equal(out[k], ref[k]), f"compiled {k} differs from eager"


def _set_cpu_isa(monkeypatch, isa):
    """Run the CPU scan kernels with the vector width of `isa`; skip where the CPU lacks it."""
    monkeypatch.setenv("MEMORYMAMBA_CPU_ISA", isa)
    inp = make_inputs(1, 3, 2, 2, 1, 1)
    try:
        run(kernel_fn("cpu"), inp, torch.ones(1, 3, 2, 2))
    except RuntimeError as e:
        if "asks for more than this CPU has" in str(e):
            pytest.skip(f"this CPU has no {isa}")
        raise


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("shape", [(1, 40, 3, 5, 1, 6, True), (1, 33, 5, 5, 4, 3, False)], ids=str)
def test_every_cpu_vector_width(monkeypatch, isa, shape):
    # The machine runs one width; the others (16, 8, 4 lanes, each its own lane grouping, transposes
    # and summation order) are forced here so that CI tests all three builds of the loops.
    _set_cpu_isa(monkeypatch, isa)
    B, D, H, W, N, R, bias = shape
    inp = make_inputs(B, D, H, W, N, R, bias=bias, act=(True, True))
    dy = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(2))
    ref = run(cross_selective_scan_ref, _fp64(inp), dy.double(), dtype=torch.float64)
    a = run(kernel_fn("cpu", deterministic=True), inp, dy)
    assert_close_fp32(a, ref, f"cpu {isa} {shape}")
    b = run(kernel_fn("cpu", deterministic=True), inp, dy)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{isa}: {k} differs between two runs"


def test_cpu_vector_width_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MEMORYMAMBA_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MEMORYMAMBA_CPU_ISA must be avx512, avx2 or baseline"):
        run(kernel_fn("cpu"), make_inputs(1, 3, 2, 2, 1, 1), torch.ones(1, 3, 2, 2))


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
                                             inp["dt_projs_bias"], inp["A_logs"], inp["Ds"], torch.empty_like(x), True,
                                             None, False)
    with pytest.raises(RuntimeError, match=r"x_shift must have shape \(batch, dim\) = \(1, 4\), got \(1, 3\)"):
        extension().cross_selective_scan_proj(x, torch.randn(1, 3), True, torch.randn(16, 4), None,
                                              torch.empty(1, 16, 9))
    with pytest.raises(RuntimeError, match="x_shift must be float32"):
        extension().cross_selective_scan_proj(x, torch.randn(1, 4).double(), True, torch.randn(16, 4), None,
                                              torch.empty(1, 16, 9))


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:7] + SHAPES[-1:] + [(2, 16, 40, 37, 1, 6, True), (2, 70, 9, 8, 1, 6, True)],
                         ids=str)
def test_cuda_fp32(cuda, shape, deterministic, act):
    # N = 16 and R = 64: the scan kernels' shared memory above 48 KB. (2, 70, ...): D spans three smem
    # slices of the projection kernel and nine channel groups of the scans, the last one partial.
    B, D, H, W, N, R, bias = shape
    inp = make_inputs(B, D, H, W, N, R, bias=bias, device="cuda", act=act)
    dy = torch.randn(B, D, H, W, device="cuda")
    ref, ref32 = _refs(inp, dy)
    out = run(kernel_fn("cuda", deterministic=deterministic), inp, dy)
    assert_close_fp32({k: v.cpu() for k, v in out.items()}, ref, f"cuda fp32 {shape} {_act_id(act)}", ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 1, 3), (3, 40, 19, 23, 1, 6), (1, 33, 70, 3, 16, 6)], ids=str)
def test_cuda_projection_kernel(cuda, shape, act, dtype):
    """The CUDA x_proj kernel against the CPU one (rows > 32 and D not a multiple of 32: partial tiles)."""
    from memorymamba._backend import extension
    B, D, H, W, N, R = shape
    inp = make_inputs(B, D, H, W, N, R, act=act)
    rows = 4 * (R + 2 * N)
    # Slice on each device: x.cuda() of a strided (non-dense) view would arrive contiguous, and the
    # kernel's stride handling would go untested.
    base = torch.randn(B, D + 2, W, H).to(dtype)
    x = base[:, 1:-1].transpose(2, 3)
    x_cuda = base.cuda()[:, 1:-1].transpose(2, 3)
    assert x_cuda.stride() == x.stride() and not x_cuda.is_contiguous()
    w, bias, shift = inp["x_proj_weight"].reshape(rows, D), inp["x_proj_bias"].reshape(rows), inp["x_shift"]
    ref = torch.empty(B, rows, H * W)
    extension().cross_selective_scan_proj(x, shift, act[1], w, bias, ref)
    out = torch.full((B, rows, H * W), float("nan"), device="cuda")
    extension().cross_selective_scan_proj(x_cuda, shift.cuda() if shift is not None else None, act[1], w.cuda(),
                                          bias.cuda(), out)
    print(f"cuda proj {shape} {_act_id(act)} {dtype}: max abs err {max_err(out.cpu(), ref):.3e}")
    torch.testing.assert_close(out.cpu(), ref, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(cuda, dtype, act):
    _check_low_precision("cuda", dtype, (2, 6, 7, 5, 1, 6), act)


@pytest.mark.gpu
@pytest.mark.parametrize("act", [(False, False), (True, True)], ids=_act_id)
def test_cuda_long_sequence_and_determinism(cuda, act):
    inp = make_inputs(2, 8, 67, 61, 4, 6, device="cuda", act=act)  # L = 4087: several segments
    dy = torch.randn(2, 8, 67, 61, device="cuda")
    a = _bits(run(kernel_fn("cuda", deterministic=True), inp, dy))
    b = _bits(run(kernel_fn("cuda", deterministic=True), inp, dy))
    for k in a:
        assert torch.equal(a[k], b[k]), f"cuda deterministic {k} differs between two runs"
    ref, ref32 = _refs(inp, dy)
    assert_close_fp32({k: v.cpu() for k, v in a.items()}, ref, "cuda long", ref32)


@pytest.mark.gpu
def test_cuda_strided_x_with_activation(cuda):
    inp = make_inputs(2, 6, 7, 9, 1, 6, device="cuda", act=(True, True))
    x = torch.randn(3, 13, 9, 20, device="cuda")[1:, ::2, 1:8, 2:20:2][:, :6]
    inp["x"] = x.clone()
    dy = torch.randn(2, 6, 7, 9, device="cuda")
    ref, ref32 = _refs(inp, dy)
    out = run(kernel_fn("cuda"), inp, dy, x=x)
    assert_close_fp32({k: v.cpu() for k, v in out.items()}, ref, "cuda strided shift+silu", ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("act,dtype", [((False, False), torch.float32), ((True, True), torch.bfloat16)],
                         ids=["plain-fp32", "shift+silu-bf16"])
def test_cuda_poisoned_outputs_are_overwritten(cuda, act, dtype):
    """The CUDA entry points with NaN-filled outputs and scratch (the op allocates them with torch.empty):
    every element must be written, and seg_states written before it is read."""
    from memorymamba._backend import extension
    C = extension()
    B, D, H, W, N, R = 2, 5, 37, 29, 2, 3  # L = 1073: several scan segments, the last partial; one channel group, part idle
    inp = make_inputs(B, D, H, W, N, R, device="cuda", act=act)
    L, K, rows = H * W, 4, 4 * (R + 2 * N)
    x, shift, silu = inp["x"].to(dtype), inp["x_shift"], inp["silu"]

    def poisoned(*shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), device="cuda", dtype=dtype)

    x_dbl = poisoned(B, rows, L)
    C.cross_selective_scan_proj(x, shift, silu, inp["x_proj_weight"].reshape(rows, D),
                                inp["x_proj_bias"].reshape(rows), x_dbl)
    assert not x_dbl.isnan().any(), "projection left elements of x_dbl unwritten"
    x_dbl = x_dbl.view(B, K, R + 2 * N, L)
    args = (x, x_dbl, inp["dt_projs_weight"], inp["dt_projs_bias"], inp["A_logs"], inp["Ds"])
    y = poisoned(B, D, H, W)  # CUDA: the fp32 accumulator
    C.cross_selective_scan_fwd(*args, y, True, shift, silu)
    assert not y.isnan().any(), "forward left elements of y unwritten"
    nseg = -(-L // C.css_cuda_segment_len)
    groups = -(-D // C.css_cuda_block_channels)
    outs = dict(du=poisoned(B, D, L), dxdbl_part=poisoned(B, K, groups, R + 2 * N, L), ddt_w_part=poisoned(B, K, D, R),
                ddt_b_part=poisoned(B, K, D), dA_logs_part=poisoned(B, K, D, N), dDs_part=poisoned(B, K, D))
    seg_states = poisoned(B, D, K, nseg, N)
    dxdbl = torch.zeros(B, K, R + 2 * N, L, device="cuda")  # untouched in deterministic mode
    C.cross_selective_scan_bwd(*args, torch.randn(B, D, H, W, device="cuda"), outs["du"], dxdbl, outs["dxdbl_part"],
                               outs["ddt_w_part"], outs["ddt_b_part"], outs["dA_logs_part"], outs["dDs_part"],
                               seg_states, True, shift, silu)
    for name, t in outs.items():
        assert not t.isnan().any(), f"backward left elements of {name} unwritten (or read unwritten seg_states)"
    act_outs = dict(dx=poisoned(B, D, H, W, dtype=dtype), u=poisoned(B, D, L))
    if shift is not None:
        act_outs["dshift"] = poisoned(B, D)
    C.cross_selective_scan_act_bwd(x, shift, silu, torch.randn(B, D, L, device="cuda"), act_outs["dx"],
                                   act_outs.get("dshift"), None, None, act_outs["u"])
    for name, t in act_outs.items():
        assert not t.isnan().any(), f"activation backward left elements of {name} unwritten"
