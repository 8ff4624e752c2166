"""The fused memory-attention kernels (CPU always; CUDA when a GPU is visible) against the fp32
reference (f.mean + memory_attention_ref per network): every memory configuration, all gradients,
dtypes, odd and strided shapes, poisoned outputs, bitwise determinism, torch.compile, input errors.
No CUDA call happens at import."""
from __future__ import annotations

import pytest
import torch

from memorymamba._backend import unavailable_reason
from memorymamba.ops import memory_attention
from memorymamba.ops.memory_attention import SIMILARITIES, memory_attention_ref

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None,
                                reason=f"CPU kernels unavailable: {unavailable_reason('cpu')}")


def gpu(test):
    """GPU-only: marked `gpu`, skipped unless the CUDA kernels can run (a GPU and a CUDA build; a GPU
    with a CPU-only build skips with the reason instead of failing in the extension)."""
    reason = unavailable_reason("cuda")
    return pytest.mark.gpu(pytest.mark.skipif(reason is not None, reason=f"CUDA kernels unavailable: {reason}")(test))

FP32_TOL = dict(rtol=1e-4, atol=1e-5)
OUT_NAMES = ("p", "w_c", "h_c", "v_c", "w_f", "h_f", "v_f")


def fused(*a, **kw):
    from memorymamba.ops._kernels.memory_attention import memory_attention_fused
    return memory_attention_fused(*a, **kw)


def make_net(D, hidden, cells, *, bias=True, seed=0):
    """One network's (w1, b1, w2, b2, memory), magnitudes like the model's (fan-in weights, O(1) cells so
    the readout and similarity are not dominated by p)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(hidden, D, generator=g) * (2 / D) ** 0.5,
            torch.randn(hidden, generator=g) * 0.1 if bias else None,
            torch.randn(cells, hidden, generator=g) * (2 / hidden) ** 0.5,
            torch.randn(cells, generator=g) * 0.1 if bias else None,
            torch.randn(cells, D, generator=g)]


def reference(f, coarse, fine, similarity):
    """(p, w_c, h_c, v_c, w_f, h_f, v_f) of the pure-PyTorch path (f's dtype, None where a net is off)."""
    p = f.mean(dim=(2, 3))
    out = [p]
    for net in (coarse, fine):
        out.extend(memory_attention_ref(p, *net, similarity) if net is not None else (None,) * 3)
    return out


def run(fn, f, coarse, fine, similarity, grads_out):
    """Outputs and the gradients of f and every parameter for the upstream gradients grads_out."""
    f = f.detach().requires_grad_(True)
    nets = [None if n is None else [None if t is None else t.detach().clone().requires_grad_(True) for t in n]
            for n in (coarse, fine)]
    outs = fn(f, nets[0], nets[1], similarity)
    loss = sum((o.float() * g).sum() for o, g in zip(outs, grads_out) if o is not None)
    leaves = [f] + [t for n in nets if n is not None for t in n if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    names = ["f"] + [f"{k}.{n}" for k, net in zip("cf", nets) if net is not None
                     for n, t in zip(("w1", "b1", "w2", "b2", "memory"), net) if t is not None]
    res = {n: o.detach() for n, o in zip(OUT_NAMES, outs) if o is not None}
    res.update({f"d{n}": g for n, g in zip(names, grads)})
    return res


def upstream(f, coarse, fine, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, D = f.shape[:2]
    shapes = [(B, D)]
    for net in (coarse, fine):
        shapes += [None] * 3 if net is None else [(B, D), (B, net[2].shape[0]), (B, D)]
    return [None if s is None else torch.randn(*s, generator=g).to(f.device) for s in shapes]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_fp32(out, ref, label):
    assert out.keys() == ref.keys(), f"{label}: {sorted(out)} vs {sorted(ref)}"
    for k in ref:
        print(f"{label} {k}: max abs err {max_err(out[k], ref[k]):.3e} (|ref| max {ref[k].abs().max().item():.3e})")
        torch.testing.assert_close(out[k].float(), ref[k].float(), **FP32_TOL, msg=lambda m: f"{label} {k}: {m}")


# (B, D, H, W, coarse (hidden, cells) | None, fine (hidden, cells) | None, bias)
CONFIGS = [
    (2, 7, 5, 3, (5, 4), (3, 8), True),      # both networks, odd D and hidden, H != W
    (1, 13, 1, 1, (16, 1), None, True),      # batch 1, 1x1 image, one cell (softmax = 1)
    (3, 9, 4, 6, None, (5, 16), False),      # fine only, 16 cells, no biases
    (2, 5, 7, 2, (3, 2), (7, 7), False),
    (1, 33, 3, 5, (16, 3), (17, 5), True),   # D above a warp
    (2, 6, 2, 3, None, None, True),          # memory off: pooling only
]


def _cfg_id(c):
    B, D, H, W, cn, fn, bias = c
    return f"B{B}D{D}_{H}x{W}_c{cn[1] if cn else 0}f{fn[1] if fn else 0}_{'bias' if bias else 'nobias'}"


def _case(cfg, device="cpu", dtype=torch.float32):
    B, D, H, W, cn, fn, bias = cfg
    f = torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(hash(cfg) % 1000)) + 0.3
    coarse = make_net(D, *cn, bias=bias, seed=2) if cn else None
    fine = make_net(D, *fn, bias=bias, seed=3) if fn else None
    mv = (lambda n: None if n is None else [None if t is None else t.to(device) for t in n])
    return f.to(device=device, dtype=dtype), mv(coarse), mv(fine)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_fp32_values_and_grads(cfg, similarity):
    f, coarse, fine = _case(cfg)
    ups = upstream(f, coarse, fine)
    ref = run(reference, f, coarse, fine, similarity, ups)
    out = run(fused, f, coarse, fine, similarity, ups)
    assert_close_fp32(out, ref, f"cpu fp32 {_cfg_id(cfg)} {similarity}")


@pytest.mark.parametrize("cells", [1, 2, 5, 16])
def test_memory_sizes(cells):
    f, _, _ = _case((2, 11, 4, 5, None, None, True))
    coarse, fine = make_net(11, 16, cells, seed=cells), make_net(11, 16, 17 - cells, seed=cells + 20)
    ups = upstream(f, coarse, fine)
    assert_close_fp32(run(fused, f, coarse, fine, "cosine", ups), run(reference, f, coarse, fine, "cosine", ups),
                      f"cells {cells}/{17 - cells}")


def test_unused_outputs_and_partial_grads():
    """Only w_c and v_f reach the loss (the model's usual pattern): the other grads are absent, not nan."""
    f, coarse, fine = _case(CONFIGS[0])
    ups = upstream(f, coarse, fine)
    ups = [u if i in (1, 6) else torch.zeros_like(u) for i, u in enumerate(ups)]
    out = run(fused, f, coarse, fine, "l2", ups)
    ref = run(reference, f, coarse, fine, "l2", ups)
    assert_close_fp32(out, ref, "partial")


@pytest.mark.parametrize("layout", ["slice", "channels_last", "transposed"])
def test_strided_f(layout):
    f, coarse, fine = _case((2, 7, 5, 6, (5, 3), (4, 6), True))
    if layout == "slice":
        view = torch.randn(3, 9, 11, 13)[:2, 1:8, 2:7, 3:9]
        view.copy_(f)
    elif layout == "channels_last":
        view = f.contiguous(memory_format=torch.channels_last)
    else:
        view = f.transpose(2, 3).contiguous().transpose(2, 3)
    assert not view.is_contiguous()
    ups = upstream(f, coarse, fine)
    assert_close_fp32(run(fused, view, coarse, fine, "cosine", ups), run(reference, f, coarse, fine, "cosine", ups),
                      layout)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_public_op_backend(similarity):
    """ops.memory_attention(p, ...) on the kernel backend = the per-network kernel on p."""
    g = torch.Generator().manual_seed(5)
    p = torch.randn(4, 19, generator=g)
    net = make_net(19, 11, 6, seed=6)
    leaves = [p] + net

    def grads(backend):
        ins = [t.clone().requires_grad_() for t in leaves]
        outs = memory_attention(*ins, similarity, backend=backend)
        gs = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, ins, gs))

    for name, a, b in zip(["w", "h", "v", "dp", "dw1", "db1", "dw2", "db2", "dmemory"], grads("cpu"), grads("torch")):
        print(f"{similarity} {name}: max abs err {max_err(a, b):.3e}")
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_half_dtypes_within_2x_torch(dtype, similarity, device="cpu"):
    """Each output / grad: error vs the fp32 reference <= 2x the same-dtype PyTorch path's + fp32 tolerance."""
    cfg = (3, 24, 7, 9, (16, 4), (16, 8), True)
    f32, coarse, fine = _case(cfg, device)
    ups = upstream(f32, coarse, fine)
    ref = run(reference, f32, coarse, fine, similarity, ups)
    ref_lp = run(reference, f32.to(dtype), coarse, fine, similarity, ups)
    out = run(fused, f32.to(dtype), coarse, fine, similarity, ups)
    for k in ref:
        assert out[k].dtype == ref_lp[k].dtype, f"{k}: dtype {out[k].dtype} vs torch's {ref_lp[k].dtype}"
        e_out, e_lp = max_err(out[k], ref[k]), max_err(ref_lp[k], ref[k])
        bound = 2 * e_lp + FP32_TOL["atol"] + FP32_TOL["rtol"] * ref[k].abs().max().item()
        print(f"{dtype} {similarity} {k}: kernel err {e_out:.3e}, torch {dtype} err {e_lp:.3e}, bound {bound:.3e}")
        assert e_out <= bound, f"{k}: {e_out:.3e} > {bound:.3e}"


def _raw_call(f, coarse, fine, similarity, poison):
    """The extension's forward + backward with outputs pre-filled with `poison`."""
    from memorymamba._backend import extension
    C = extension()
    B, D = f.shape[:2]
    kw = dict(device=f.device)
    p = torch.full((B, D), poison, dtype=torch.float32, **kw)
    fwd_args, bwd_args, outs = [], [], [p]
    for net in (coarse, fine):
        w1, b1, w2, b2, mem = net
        m = w2.shape[0]
        o = [torch.full(s, poison, dtype=f.dtype, **kw) for s in ((B, D), (B, m), (B, D))]
        gr = [torch.full(t.shape, poison, dtype=torch.float32, **kw) for t in net]
        ups = [torch.randn(*s, **kw) for s in ((B, D), (B, m), (B, D))]
        fwd_args.append([*net, *o])
        bwd_args.append([*net, *ups, *gr])
        outs += o + gr
    C.memory_attention_fwd(f, p, SIMILARITIES.index(similarity), fwd_args)
    dp = torch.full((B, D), poison, dtype=torch.float32, **kw)
    C.memory_attention_bwd(p, torch.randn(B, D, **kw), dp, 0.5, SIMILARITIES.index(similarity), bwd_args)
    return outs + [dp]


def test_poisoned_outputs_are_overwritten(device="cpu"):
    f, coarse, fine = _case((2, 9, 3, 4, (5, 3), (6, 7), True), device)
    for t in _raw_call(f, coarse, fine, "cosine", float("nan")):
        assert torch.isfinite(t).all(), "an output element was left unwritten"


def test_deterministic_bitwise_any_thread_count():
    f, coarse, fine = _case((5, 21, 6, 7, (8, 4), (9, 8), True))
    ups = upstream(f, coarse, fine)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run(fused, f, coarse, fine, "l2", ups))
    finally:
        torch.set_num_threads(threads)
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), f"{k} differs between thread counts"


def test_torch_compile_fullgraph():
    f, coarse, fine = _case((2, 7, 4, 5, (5, 3), (4, 6), True))
    ups = upstream(f, coarse, fine)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert_close_fp32(run(compiled, f, coarse, fine, "cosine", ups), run(fused, f, coarse, fine, "cosine", ups),
                      "compiled")


def test_opcheck():
    from memorymamba.ops._kernels.memory_attention import _fused
    f, coarse, fine = _case((2, 5, 3, 4, (4, 3), (3, 5), True))
    args = (f.requires_grad_(), *[t.requires_grad_() for t in coarse], *[None] * 5, 0)
    torch.library.opcheck(_fused, args)


BAD = [
    ("f rank", lambda a: a.update(f=a["f"][0]), ValueError, "f_tilde must be a tensor of shape (B, D, H, W)"),
    ("f dtype", lambda a: a.update(f=a["f"].double()), TypeError, "f_tilde must be float32, float16 or bfloat16"),
    ("similarity", lambda a: a.update(similarity="dot"), ValueError, "similarity must be one of"),
    ("w1 D", lambda a: a["coarse"].__setitem__(0, a["coarse"][0][:, :-1]), ValueError,
     "w1 must have shape (Hd, D) with D = 7"),
    ("memory m", lambda a: a["fine"].__setitem__(4, a["fine"][4][:-1]), ValueError,
     "memory must have shape (m, D) = (6, 7), got (5, 7)"),
    ("net length", lambda a: a.update(fine=a["fine"][:4]), ValueError, "fine must be (w1, b1, w2, b2, memory)"),
    ("param float64", lambda a: a["coarse"].__setitem__(2, a["coarse"][2].double()), TypeError,
     "coarse.w2 must be float32"),
]


@pytest.mark.parametrize("change,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(change, error, message):
    f, coarse, fine = _case((2, 7, 3, 4, (5, 3), (4, 6), True))
    args = dict(f=f, coarse=list(coarse), fine=list(fine), similarity="cosine")
    change(args)
    with pytest.raises(error) as info:
        fused(args["f"], args["coarse"], args["fine"], args["similarity"])
    assert message in str(info.value)


def test_extension_checks_name_the_tensor():
    from memorymamba._backend import extension
    f, coarse, fine = _case((2, 7, 3, 4, (5, 3), None, True))
    p = torch.empty(2, 6)
    with pytest.raises(RuntimeError, match=r"p must have shape \(batch, dim\) = \(2, 7\), got \(2, 6\)"):
        extension().memory_attention_fwd(f, p, 0, [[*coarse, torch.empty(2, 7), torch.empty(2, 3), torch.empty(2, 7)]])


# ---- GPU (skipped without a CUDA device) ------------------------------------------------------

@gpu
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("cfg", CONFIGS + [(8, 96, 56, 56, (16, 4), (16, 8), True),
                                           (3, 768, 7, 7, (96, 4), (96, 8), True)], ids=_cfg_id)
def test_cuda_fp32_values_and_grads(cfg, similarity):
    f, coarse, fine = _case(cfg)
    ups = upstream(f, coarse, fine)
    ref = run(reference, f, coarse, fine, similarity, ups)
    fc, cc, fnc = _case(cfg, "cuda")
    out = run(fused, fc, cc, fnc, similarity, [None if u is None else u.cuda() for u in ups])
    assert_close_fp32({k: v.cpu() for k, v in out.items()}, ref, f"cuda fp32 {_cfg_id(cfg)} {similarity}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_dtypes_within_2x_torch(dtype):
    for similarity in SIMILARITIES:
        test_half_dtypes_within_2x_torch(dtype, similarity, device="cuda")


@gpu
def test_cuda_strided_poison_and_determinism():
    test_poisoned_outputs_are_overwritten(device="cuda")
    f, coarse, fine = _case((6, 40, 9, 11, (16, 4), (16, 8), True), "cuda")
    view = f.contiguous(memory_format=torch.channels_last)
    ups = upstream(f, coarse, fine)
    a = run(fused, view, coarse, fine, "cosine", ups)
    b = run(fused, view, coarse, fine, "cosine", ups)
    c = run(reference, f, coarse, fine, "cosine", ups)
    for k in a:
        assert torch.equal(a[k], b[k]), f"cuda {k} not bitwise reproducible"
    assert_close_fp32(a, c, "cuda channels_last")


@gpu
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_cuda_dim_over_48kb_of_shared_memory(similarity):
    """D = 3200: the kernels' 4*D floats of scratch pass 48 KB, the opt-in path (cudaFuncSetAttribute)
    that no other test reaches. Sums over D this long need atol scaled to each tensor (as selective_scan's)."""
    cfg = (2, 3200, 2, 3, (8, 4), (8, 3), True)
    f, coarse, fine = _case(cfg)
    ups = upstream(f, coarse, fine)
    ref = run(reference, f, coarse, fine, similarity, ups)
    fc, cc, fnc = _case(cfg, "cuda")
    out = run(fused, fc, cc, fnc, similarity, [None if u is None else u.to(fc.device) for u in ups])
    assert out.keys() == ref.keys()
    for k in ref:
        scale = max(1.0, ref[k].abs().max().item())
        print(f"cuda D=3200 {similarity} {k}: max abs err {max_err(out[k].cpu(), ref[k]):.3e} (|ref| max {scale:.3e})")
        torch.testing.assert_close(out[k].cpu().float(), ref[k].float(), rtol=FP32_TOL["rtol"],
                                   atol=FP32_TOL["atol"] * scale, msg=lambda m: f"{k}: {m}")
