"""The compiled selective_scan kernels (CPU; CUDA when a GPU is visible) against the fp32 loop reference.

fp32 kernels must match the fp32 reference to rtol 1e-4 / atol 1e-5 of the tensor's scale;
fp16/bf16 kernels may be off the fp32 reference by at most 2x the error of the same-dtype
reference (selective_scan_ref on the low-precision inputs), plus that fp32 floor.
"""
import itertools

import pytest
import torch

from conftest import assert_close, require_backend
from memorymamba.ops.selective_scan import selective_scan_fn, selective_scan_ref

OP = "selective_scan"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
RTOL, ATOL_SCALE = 1e-4, 1e-5


def _kernels():
    from memorymamba.ops._kernels import selective_scan as k
    return k


def make_inputs(batch, dim, L, N, G_B, G_C, has_D, has_z, has_bias, softplus, dtype, device):
    """G_B / G_C: None for a constant (dim, N) B / C, else the group count of (batch, G, N, L)."""
    act = dict(dtype=dtype, device=device)
    par = dict(dtype=torch.float32, device=device)
    bc = lambda G: torch.randn(dim, N, **par) if G is None else torch.randn(batch, G, N, L, **act)  # noqa: E731
    delta = (0.5 * torch.randn(batch, dim, L, **act) if softplus
             else 0.05 + 0.5 * torch.rand(batch, dim, L, **act))  # positive: the state decays
    return dict(u=torch.randn(batch, dim, L, **act), delta=delta,
                A=-(0.1 + 1.4 * torch.rand(dim, N, **par)), B=bc(G_B), C=bc(G_C),
                D=torch.randn(dim, **par) if has_D else None,
                z=torch.randn(batch, dim, L, **act) if has_z else None,
                # Without softplus, delta + bias must stay positive: a negative delta makes
                # exp(delta*A) > 1 and the state (and the fp32 reference) overflow at L = 613.
                delta_bias=(0.3 * torch.randn(dim, **par) if softplus else 0.1 * torch.rand(dim, **par))
                if has_bias else None,
                delta_softplus=softplus)


def _tensors(inputs):
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def run(fn, inputs, dout):
    """out, last_state and the grads of every tensor input for loss = sum(out * dout)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in _tensors(inputs).items()}
    out, last = fn(**{**inputs, **leaves}, return_last_state=True)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out.detach(), last.detach(), dict(zip(leaves, grads))


def kernel_fn(**kw):
    return _kernels().selective_scan(**kw)


def check_against_reference(inputs, dtype, dout=None):
    """Compare the kernel (on the inputs' device) with the fp32 loop reference on the CPU."""
    u = inputs["u"]
    dout = torch.randn_like(u) if dout is None else dout
    out, last, grads = run(kernel_fn, inputs, dout)
    assert out.dtype == dtype and last.dtype == torch.float32
    cpu32 = {k: (v.detach().cpu().float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ex_out, ex_last, ex_grads = run(selective_scan_ref, cpu32, dout.cpu().float())
    results = [("out", out, ex_out), ("last_state", last, ex_last)]
    results += [(f"grad {k}", grads[k], ex_grads[k]) for k in grads]
    for name, got, _ in results:
        if name.startswith("grad"):
            assert got.dtype == inputs[name[5:]].dtype, f"{name} has dtype {got.dtype}"
    if dtype == torch.float32:
        for name, got, exp in results:
            assert_close(name, got, exp, rtol=RTOL, atol=ATOL_SCALE * max(1.0, exp.abs().max().item()))
        return
    cpu_lp = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    lp_out, lp_last, lp_grads = run(selective_scan_ref, cpu_lp, dout.cpu())
    same = {"out": lp_out, "last_state": lp_last, **{f"grad {k}": lp_grads[k] for k in lp_grads}}
    for name, got, exp in results:
        err = (got.cpu().double() - exp.double()).abs().max().item()
        ref_err = (same[name].double() - exp.double()).abs().max().item()
        floor = ATOL_SCALE * max(1.0, exp.abs().max().item())
        print(f"{name}: kernel max err {err:.3e}, same-dtype reference max err {ref_err:.3e}")
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} > 2 x {ref_err:.3e} + {floor:.1e}"


# ---------------------------------------------------------------- CPU

FLAGS = list(itertools.product([None, 2], [None, 2], [False, True], [False, True], [False, True],
                               [False, True]))


def _flag_id(f):
    gb, gc, D, z, bias, sp = f
    return (f"B{'c' if gb is None else 'v'}C{'c' if gc is None else 'v'}" + "-D" * D + "-z" * z
            + "-bias" * bias + "-sp" * sp)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flags", FLAGS, ids=[_flag_id(f) for f in FLAGS])
def test_cpu_every_flag_and_dtype(flags, dtype):
    require_backend("cpu", OP)
    gb, gc, D, z, bias, sp = flags
    check_against_reference(make_inputs(2, 4, 45, 3, gb, gc, D, z, bias, sp, dtype, "cpu"), dtype)


@pytest.mark.parametrize("L", [1, 7, 127, 129, 2049])
@pytest.mark.parametrize("N", [1, 4, 16])
@pytest.mark.parametrize("G", [1, 2])
def test_cpu_lengths_states_groups(L, N, G):
    require_backend("cpu", OP)
    check_against_reference(make_inputs(2, 4, L, N, G, G, True, True, True, True, torch.float32, "cpu"),
                            torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_crosses_chunks_low_precision(dtype):
    """L over several kernel chunks (and not a multiple of one) with mixed constant/variable B/C."""
    require_backend("cpu", OP)
    L = 2 * _kernels().chunk_size() + 77
    check_against_reference(make_inputs(1, 4, L, 2, 4, None, True, True, True, True, dtype, "cpu"), dtype)


def test_cpu_long_sequence():
    require_backend("cpu", OP)
    check_against_reference(make_inputs(1, 2, 16384, 2, 1, 1, True, True, True, True, torch.float32, "cpu"),
                            torch.float32)


def test_cpu_n_64_and_over_64():
    require_backend("cpu", OP)
    check_against_reference(make_inputs(1, 2, 33, 64, 1, None, True, False, True, True, torch.float32, "cpu"),
                            torch.float32)
    bad = make_inputs(1, 2, 5, 65, 1, 1, False, False, False, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="N = 65 states; the compiled kernels support N <= 64"):
        kernel_fn(**bad)


def test_cpu_strided_views():
    """Inputs sliced out of larger tensors (batch/dim/group/state strides are not the packed ones)."""
    require_backend("cpu", OP)
    b, d, L, N, G = 2, 4, 131, 3, 2
    big = lambda *s: torch.randn(*s)  # noqa: E731
    inputs = dict(
        u=big(b + 1, 2 * d, L + 9)[1:, ::2, 3:3 + L],
        delta=(0.5 * big(b, d + 3, L + 1))[:, 2:d + 2, 1:],
        A=-(0.1 + big(d, 2 * N).abs())[:, ::2],
        B=big(b, 2 * G, N + 1, L + 2)[:, 1::2, 1:, :L],
        C=big(b, G, N, L + 5)[..., 5:],
        D=big(2 * d)[::2], z=big(b, d, 2 * L)[..., ::2],  # z: a step in L, copied by the wrapper
        delta_bias=big(d + 1)[1:], delta_softplus=True)
    assert not inputs["u"].is_contiguous() and not inputs["B"].is_contiguous()
    packed = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    dout = torch.randn(b, d, L)
    out, last, grads = run(kernel_fn, inputs, dout)
    out_p, last_p, grads_p = run(kernel_fn, packed, dout)
    assert torch.equal(out, out_p) and torch.equal(last, last_p)
    for k in grads:
        assert torch.equal(grads[k], grads_p[k]), k
    check_against_reference(inputs, torch.float32, dout)


def _fresh_outputs(inputs, fill):
    u, A = inputs["u"], inputs["A"]
    k = _kernels()
    n_chunks = -(-u.shape[-1] // k.chunk_size())
    return (torch.full_like(u, fill), torch.full((*u.shape[:2], n_chunks, A.shape[1]), fill))


@pytest.mark.parametrize("with_z", [False, True])
def test_cpu_poisoned_outputs_are_all_written(with_z):
    """Outputs filled with NaN before the kernel: any element it forgets to write stays NaN."""
    require_backend("cpu", OP)
    from memorymamba._backend import extension
    _C = extension()
    inputs = make_inputs(2, 4, 1100, 3, 2, 2, True, with_z, True, True, torch.float32, "cpu")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")]
    out, states = _fresh_outputs(inputs, float("nan"))
    _C.selective_scan_fwd(*args, out, states)
    assert not out.isnan().any() and not states.isnan().any()
    ref_out, ref_states = _kernels().selective_scan_fwd(*args)
    assert torch.equal(out, ref_out) and torch.equal(states, ref_states)
    dout = torch.randn_like(out)
    du, ddelta = torch.full_like(out, float("nan")), torch.full_like(out, float("nan"))
    dz = torch.full_like(out, float("nan")) if with_z else None
    zeros = lambda t: torch.zeros_like(t)  # noqa: E731 - accumulated grads start at zero by contract
    dA, dB, dC, dD, ddb = (zeros(inputs[k]) for k in ("A", "B", "C", "D", "delta_bias"))
    _C.selective_scan_bwd(*args, states, dout, du, ddelta, dA, dB, dC, dD, ddb, dz)
    for g in (du, ddelta, dA, dB, dC, dD, ddb) + ((dz,) if with_z else ()):
        assert not g.isnan().any()
    ref = _kernels().selective_scan_bwd(*args, states, dout)
    assert torch.equal(du, ref[0]) and torch.equal(ddelta, ref[1]) and torch.equal(dA, ref[2])
    if with_z:
        assert torch.equal(dz, ref[7])


def _check_empty_batch(device):
    """batch 0 (variable B/C, z, D, bias): empty out and grads, zero parameter grads, no launch error."""
    inputs = make_inputs(0, 4, 9, 2, 2, 2, True, True, True, True, torch.float32, device)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in _tensors(inputs).items()}
    out = kernel_fn(**{**inputs, **leaves})
    assert out.shape == (0, 4, 9)
    out.sum().backward()  # an expanded, empty dout
    for k, t in leaves.items():
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), k


def test_cpu_empty_batch():
    require_backend("cpu", OP)
    _check_empty_batch("cpu")


def test_cpu_gate_of_very_negative_z_and_the_callers_denormal_mode():
    """silu(z) for z < -88 is where the compiled exp's clamp makes denormal intermediates: the CPU
    kernels flush them inside (FlushDenormals) and must leave this thread's float mode as it was."""
    require_backend("cpu", OP)
    assert (torch.tensor([1e-38]) / 4).item() != 0  # denormals are kept here before the call
    g = torch.Generator().manual_seed(3)
    B, D, L, N = 2, 4, 70, 2
    u, delta = torch.randn(B, D, L, generator=g), torch.rand(B, D, L, generator=g)
    A, Bv, Cv = -torch.rand(D, N, generator=g) - 0.5, torch.randn(B, 1, N, L, generator=g), torch.randn(B, 1, N, L, generator=g)
    z = torch.randn(B, D, L, generator=g) * 60 - 60  # down to ~-300
    for x in (u, delta, z):
        x.requires_grad_(True)
    out = selective_scan_fn(u, delta, A, Bv, Cv, z=z, backend="cpu")
    out.sum().backward()
    assert (torch.tensor([1e-38]) / 4).item() != 0, "the kernel left flush-to-zero on in the caller's thread"
    ref = selective_scan_ref(u.detach().double(), delta.detach().double(), A.double(), Bv.double(), Cv.double(),
                             z=z.detach().double())
    assert_close("gate of very negative z", out, ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(u.grad).all() and torch.isfinite(z.grad).all()


def test_cpu_deterministic():
    require_backend("cpu", OP)
    inputs = make_inputs(1, 6, 700, 2, 1, 1, True, True, True, True, torch.float32, "cpu")
    dout = torch.randn(1, 6, 700)
    a, b = run(kernel_fn, inputs, dout), run(kernel_fn, inputs, dout)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_cpu_selective_scan_fn_dispatches_here():
    """selective_scan_fn(backend="cpu") runs these kernels, (batch, N, L) B/C and fp32 B with fp16 u."""
    require_backend("cpu", OP)
    inputs = make_inputs(2, 4, 19, 2, 1, 1, True, True, True, True, torch.float16, "cpu")
    inputs["B"] = inputs["B"][:, 0]  # (batch, N, L): one group
    inputs["C"] = inputs["C"][:, 0].float()  # fp32 variable C with fp16 u: maths stays fp32
    out = selective_scan_fn(**inputs, backend="cpu")
    exact = selective_scan_ref(**{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    same = selective_scan_ref(**inputs)
    err, ref_err = (out.float() - exact).abs().max().item(), (same.float() - exact).abs().max().item()
    print(f"fp16 via selective_scan_fn: err {err:.3e}, same-dtype reference err {ref_err:.3e}")
    assert out.dtype == torch.float16 and err <= 2 * ref_err + ATOL_SCALE


@pytest.mark.parametrize("change, message", [
    (dict(delta=(2, 4, 9)), r"delta must have shape \(batch, dim, L\) = \(2, 4, 10\), got \(2, 4, 9\)"),
    (dict(B=(2, 3, 3, 10)), r"groups G of B/C must divide dim = 4, got G = 3"),
    (dict(C=(2, 2, 3, 11)), r"C must have shape \(batch, G, N, L\) = \(2, 2, 3, 10\), got \(2, 2, 3, 11\)"),
    (dict(D=(5,)), r"D must have shape \(dim,\) = \(4,\), got \(5,\)"),
])
def test_cpu_bad_shapes_name_the_argument(change, message):
    require_backend("cpu", OP)
    from memorymamba._backend import extension
    inputs = make_inputs(2, 4, 10, 3, 2, 2, True, False, False, False, torch.float32, "cpu")
    for k, shape in change.items():
        inputs[k] = torch.randn(shape)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")]
    out, states = _fresh_outputs(inputs, 0.0)
    with pytest.raises(RuntimeError, match=message):
        extension().selective_scan_fwd(*args, out, states)


def test_cpu_torch_compile_fullgraph():
    """A tiny module over the custom ops compiles with fullgraph=True and matches eager, grads included."""
    require_backend("cpu", OP)
    k = _kernels()

    class Tiny(torch.nn.Module):
        def __init__(self, dim, N):
            super().__init__()
            self.A_log = torch.nn.Parameter(torch.randn(dim, N) * 0.3)
            self.D = torch.nn.Parameter(torch.randn(dim))
            self.bias = torch.nn.Parameter(torch.randn(dim) * 0.3)

        def forward(self, u, delta, B, C):
            y = k.selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D, None, self.bias, True)
            return (y * y).sum()

    torch.manual_seed(0)
    m = Tiny(4, 2)
    u, delta = torch.randn(2, 4, 23, requires_grad=True), torch.randn(2, 4, 23)
    B, C = torch.randn(2, 1, 2, 23), torch.randn(2, 1, 2, 23)
    eager = m(u, delta, B, C)
    g_eager = torch.autograd.grad(eager, [u, *m.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = compiled(u, delta, B, C)
    g_comp = torch.autograd.grad(loss, [u, *m.parameters()])
    assert_close("loss", loss, eager, rtol=1e-6, atol=1e-6)
    for i, (a, b) in enumerate(zip(g_comp, g_eager)):
        assert_close(f"grad {i}", a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

GPU_FLAGS = [f for f in FLAGS if f[3] == f[4]]  # z and bias together: 32 combinations


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flags", GPU_FLAGS, ids=[_flag_id(f) for f in GPU_FLAGS])
def test_cuda_every_flag_and_dtype(flags, dtype):
    device = require_backend("cuda", OP)
    gb, gc, D, z, bias, sp = flags
    check_against_reference(make_inputs(2, 4, 613, 3, gb, gc, D, z, bias, sp, dtype, device), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 7, 127, 129, 2049])
@pytest.mark.parametrize("N", [1, 4, 16, 64])
@pytest.mark.parametrize("G", [1, 2])
def test_cuda_lengths_states_groups(L, N, G):
    device = require_backend("cuda", OP)
    check_against_reference(make_inputs(2, 4, L, N, G, G, True, True, True, True, torch.float32, device),
                            torch.float32)


@pytest.mark.gpu
def test_cuda_long_sequence_matches_cpu_kernel():
    device = require_backend("cuda", OP)
    require_backend("cpu", OP)
    inputs = make_inputs(2, 3, 16384, 4, 1, 1, True, True, True, True, torch.float32, device)
    dout = torch.randn(2, 3, 16384, device=device)
    out, last, grads = run(kernel_fn, inputs, dout)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out_c, last_c, grads_c = run(kernel_fn, cpu, dout.cpu())
    for name, a, b in [("out", out, out_c), ("last_state", last, last_c)] + [
            (f"grad {k}", grads[k], grads_c[k]) for k in grads]:
        assert_close(name, a, b, rtol=RTOL, atol=ATOL_SCALE * max(1.0, b.abs().max().item()))


@pytest.mark.gpu
def test_cuda_strided_and_poisoned():
    device = require_backend("cuda", OP)
    from memorymamba._backend import extension
    b, d, L, N = 2, 4, 1100, 3
    inputs = make_inputs(b, 2 * d, L + 3, N, 2, 2, True, True, True, True, torch.float32, device)
    view = {k: (v[:, ::2, 3:] if k in ("u", "delta", "z") else v) for k, v in inputs.items()}
    view["B"], view["C"] = view["B"][..., 3:], view["C"][..., 3:]
    view["A"], view["D"], view["delta_bias"] = view["A"][::2], view["D"][::2], view["delta_bias"][::2]
    check_against_reference(view, torch.float32)
    args = [view[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")]
    out = torch.full((b, d, L), float("nan"), device=device)
    states = torch.full((b, d, -(-L // _kernels().chunk_size()), N), float("nan"), device=device)
    extension().selective_scan_fwd(*args, out, states)
    assert not out.isnan().any() and not states.isnan().any()


@pytest.mark.gpu
def test_cuda_empty_batch():
    _check_empty_batch(require_backend("cuda", OP))
