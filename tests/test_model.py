"""The MemoryMamba model: configs, parameter sets of the ablation switches, forward/backward, the
memory path against a functional re-composition with the reference ops, and argument errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memorymamba
from memorymamba import ops
from memorymamba.model import MemoryAux, model_config
from memorymamba.nn import SS2D, MemSS2D
from tests.conftest import assert_close, require_backend

MEMORY_OFF = dict(use_coarse_memory=False, use_fine_memory=False, use_fusion=False)
# Parameter counts of VMamba's own vmamba_{tiny_s1l8, small_s1l20, base_s1l20} (1000 classes), counted
# from MzeroMiko/VMamba classification/models/vmamba.py; memory off, ours must be the same network.
VMAMBA_PARAMS = {"memorymamba_tiny": 30_249_064, "memorymamba_small": 49_012_840, "memorymamba_base": 86_614_504}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def names(model):
    return {n for n, _ in model.named_parameters()}


def test_list_models():
    assert memorymamba.list_models() == ["memorymamba_base", "memorymamba_nano", "memorymamba_small",
                                         "memorymamba_tiny"]


@pytest.mark.parametrize("name", ["memorymamba_nano", "memorymamba_tiny", "memorymamba_small", "memorymamba_base"])
def test_full_config_parameter_count(name):
    with torch.device("meta"):  # shapes only: counting needs no storage or initialisation
        with_memory = n_params(memorymamba.create_model(name))
        without = n_params(memorymamba.create_model(name, **MEMORY_OFF))
    print(f"{name}: {with_memory:,} parameters with memory, {without:,} without "
          f"(+{100 * (with_memory / without - 1):.1f}%)")
    if name in VMAMBA_PARAMS:
        assert without == VMAMBA_PARAMS[name]
    assert without < with_memory < 1.06 * without


def test_named_config_values():
    tiny = model_config("memorymamba_tiny")
    assert tiny["dims"] == [96, 192, 384, 768] and tiny["depths"] == [2, 2, 8, 2]
    assert (tiny["d_state"], tiny["ssm_ratio"], tiny["mlp_ratio"], tiny["drop_path_rate"]) == (1, 1.0, 4.0, 0.2)
    assert model_config("memorymamba_small")["depths"] == [2, 2, 20, 2]
    base = model_config("memorymamba_base")
    assert base["dims"][0] == 128 and base["drop_path_rate"] == 0.5
    model = memorymamba.create_model("memorymamba_tiny")
    op = model.layers[2].blocks[0].op
    assert (op.d_inner, op.dt_rank, op.d_state) == (384, 24, 1)  # dt_rank = ceil(384 / 16)
    assert op.conv2d.bias is None and op.in_proj.bias is None


def test_conv_norm():
    # VMamba configs keep ln2d (their checkpoints load); "bn" swaps exactly the norms after strided convs.
    assert [model_config(n)["conv_norm"] for n in ("memorymamba_tiny", "memorymamba_small", "memorymamba_base")] == [
        "ln2d"] * 3
    assert model_config("memorymamba_nano")["conv_norm"] == "bn"
    ln = memorymamba.create_model("memorymamba_nano", conv_norm="ln2d")
    bn = memorymamba.create_model("memorymamba_nano")
    conv_norms = [bn.patch_embed[2], bn.patch_embed[7]] + [s.downsample[3] for s in bn.layers[:-1]]
    assert all(type(m) is nn.BatchNorm2d for m in conv_norms)
    assert sum(type(m) is nn.BatchNorm2d for m in bn.modules()) == len(conv_norms) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ln.modules())
    assert names(bn) == names(ln)  # same parameter names; BN adds running-stat buffers only
    bn(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("name", ["memorymamba_nano", "memorymamba_tiny", "memorymamba_small", "memorymamba_base"])
def test_forward_backward_small_resolution(name):
    # Reduced depths keep the CPU time down; widths and every layer type are the config's own.
    model = memorymamba.create_model(name, num_classes=5, depths=[1, 1, 1, 1], backend="torch")
    model.train()
    x = torch.randn(2, 3, 33, 29)
    target = torch.tensor([1, 3])
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    loss, parts = memorymamba.MemoryMambaLoss()(logits, target, aux)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    assert all(torch.isfinite(v) for v in parts.values())


def test_aux_contents():
    model = memorymamba.create_model("memorymamba_nano", num_classes=3, depths=[1, 2, 1, 1], backend="torch")
    logits, aux = model(torch.randn(3, 3, 40, 36), return_aux=True)
    assert isinstance(aux, MemoryAux) and len(aux.blocks) == 5
    dims = model.config["dims"]
    stage_of_block = [0, 1, 1, 2, 3]
    for block, stage in zip(aux.blocks, stage_of_block):
        assert block.coarse_logits.shape == (3, 4)
        assert block.pooled.shape == block.fine_proj.shape == (3, dims[stage])
    assert len(aux.coarse) == len(aux.fine) == 5
    only_coarse = memorymamba.create_model("memorymamba_nano", use_fine_memory=False, backend="torch")
    _, aux = only_coarse(torch.randn(2, 3, 32, 32), return_aux=True)
    assert len(aux.coarse) == 5 and aux.fine == []
    vmamba = memorymamba.create_model("memorymamba_nano", **MEMORY_OFF, backend="torch")
    _, aux = vmamba(torch.randn(2, 3, 32, 32), return_aux=True)
    assert aux.coarse == [] and aux.fine == []


def test_return_aux_does_not_change_logits():
    model = memorymamba.create_model("memorymamba_nano", num_classes=4, backend="torch").eval()
    x = torch.randn(2, 3, 37, 31)
    with torch.no_grad():
        plain = model(x)
        with_aux, _ = model(x, return_aux=True)
    assert torch.equal(plain, with_aux)


def test_ablation_switches_remove_exactly_their_parameters():
    full = names(memorymamba.create_model("memorymamba_nano"))
    coarse = {n for n in full if ".coarse_memory." in n}
    fine = {n for n in full if ".fine_memory." in n}
    fusion = {n for n in full if n.endswith("_memory.scale")}
    assert coarse and fine and fusion and fusion <= coarse | fine
    assert all(n.endswith(("query.fc1.weight", "query.fc1.bias", "query.fc2.weight", "query.fc2.bias", "cells",
                           "scale", "proj.fc1.weight", "proj.fc1.bias", "proj.fc2.weight", "proj.fc2.bias"))
               for n in coarse | fine)
    assert not any(".proj." in n for n in coarse) and any(".proj." in n for n in fine)
    cases = {
        "use_coarse_memory": coarse, "use_fine_memory": fine, "use_fusion": fusion,
    }
    for switch, owned in cases.items():
        reduced = names(memorymamba.create_model("memorymamba_nano", **{switch: False}))
        assert reduced <= full, f"{switch}=False added parameters {reduced - full}"
        assert full - reduced == owned, f"{switch}=False removed {sorted(full - reduced)[:4]}..."
    vmamba = names(memorymamba.create_model("memorymamba_nano", **MEMORY_OFF))
    assert vmamba == full - coarse - fine
    # Memory sizes change only the memory shapes.
    bigger = memorymamba.create_model("memorymamba_nano", coarse_memory_size=7, fine_memory_size=3)
    assert names(bigger) == full
    assert bigger.layers[0].blocks[0].op.coarse_memory.cells.shape == (7, 32)
    assert bigger.layers[0].blocks[0].op.fine_memory.query.fc2.weight.shape == (3, 16)


def _ss2d_by_hand(op: SS2D, x: torch.Tensor) -> torch.Tensor:
    """The Mem-SSM mixer written out with the reference ops (DESIGN section 2, steps 1-6)."""
    f = F.conv2d(x, op.in_proj.weight[:, :, None, None])
    f = F.conv2d(f, op.conv2d.weight, None, padding=1, groups=f.shape[1])
    p = f.mean(dim=(2, 3))
    for mem in (op.coarse_memory, op.fine_memory):
        if mem is None:
            continue
        w, _, v = ops.memory_attention_ref(p, mem.query.fc1.weight, mem.query.fc1.bias, mem.query.fc2.weight,
                                           mem.query.fc2.bias, mem.cells, mem.similarity)
        f = f + (mem.scale * w if mem.fusion else v)[:, :, None, None]
    y = ops.cross_selective_scan_ref(F.silu(f), op.x_proj_weight, op.dt_projs_weight, op.dt_projs_bias,
                                     op.A_logs, op.Ds)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), op.out_norm.weight, op.out_norm.bias).permute(0, 3, 1, 2)
    return F.conv2d(y, op.out_proj.weight[:, :, None, None])


@pytest.mark.parametrize("similarity", ["cosine", "l1", "l2"])
@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("memories", [(3, 5), (2, 0), (0, 6)])
def test_memss2d_matches_hand_composition(similarity, fusion, memories):
    op = SS2D(d_model=12, d_state=2, ssm_ratio=1.5, conv_bias=False, coarse_memory_size=memories[0],
              fine_memory_size=memories[1], fusion=fusion, similarity=similarity, backend="torch")
    with torch.no_grad():  # cells large enough that the memory visibly changes the output
        for mem in (op.coarse_memory, op.fine_memory):
            if mem is not None:
                mem.cells.normal_()
                if fusion:
                    mem.scale.fill_(0.7)
    x = torch.randn(2, 12, 5, 7)
    out = op(x)
    assert_close("MemSS2D vs hand composition", out, _ss2d_by_hand(op, x), rtol=1e-4, atol=1e-5)
    # The memory must matter: the same weights without it give a different output.
    plain = SS2D(d_model=12, d_state=2, ssm_ratio=1.5, conv_bias=False, backend="torch")
    plain.load_state_dict(op.state_dict(), strict=False)
    assert (plain(x) - out).abs().max() > 1e-3


@pytest.mark.parametrize("memories", [(3, 5), (0, 0)], ids=["memory", "no-memory"])
@pytest.mark.parametrize("act_layer", [nn.SiLU, nn.GELU], ids=["silu", "gelu"])
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_ss2d_compiled_backend_fuses_memory_add_and_silu(backend, act_layer, memories, monkeypatch):
    """On a compiled backend SS2D hands f, the memory vector (x_shift) and silu=True to the scan (only
    for SiLU); values and every gradient match the PyTorch path on the same weights."""
    device = require_backend(backend, "cross_selective_scan")
    ref = SS2D(d_model=12, d_state=2, ssm_ratio=1.5, conv_bias=False, coarse_memory_size=memories[0],
               fine_memory_size=memories[1], act_layer=act_layer, backend="torch")
    with torch.no_grad():
        for mem in (ref.coarse_memory, ref.fine_memory):
            if mem is not None:
                mem.cells.normal_()
                mem.scale.fill_(0.7)
    fast = SS2D(d_model=12, d_state=2, ssm_ratio=1.5, conv_bias=False, coarse_memory_size=memories[0],
                fine_memory_size=memories[1], act_layer=act_layer, backend=backend).to(device)
    fast.load_state_dict(ref.state_dict())
    calls = []
    op = ops.cross_selective_scan

    def spy(*args, **kwargs):
        calls.append((kwargs["x_shift"] is not None, kwargs["silu"]))
        return op(*args, **kwargs)

    monkeypatch.setattr(ops, "cross_selective_scan", spy)
    x = torch.randn(2, 12, 5, 7)
    results = []
    for module, dev in ((ref, "cpu"), (fast, device)):
        xi = x.detach().to(dev).requires_grad_()  # a leaf on each device (x.to("cpu") is x itself)
        out = module(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(dev))
        results.append((out, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    fused = act_layer is nn.SiLU
    assert calls == [(False, False), (fused and memories != (0, 0), fused)]
    assert_close(f"{backend} vs torch SS2D", results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    assert_close(f"{backend} vs torch SS2D grad x", results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    for n, g in results[0][2].items():
        if g is None:  # fine_memory.proj: only the losses (return_aux) use it
            assert results[1][2][n] is None, n
            continue
        assert_close(f"{backend} vs torch SS2D grad {n}", results[1][2][n], g, rtol=1e-3, atol=1e-5)


def test_ss2d_accepts_vmamba_arguments_and_channel_last():
    kwargs = dict(d_model=20, d_state=1, ssm_ratio=1.0, dt_rank="auto", act_layer=nn.SiLU, d_conv=3,
                  conv_bias=False, dropout=0.0, bias=False, dt_min=0.001, dt_max=0.1, dt_init="random",
                  dt_scale=1.0, dt_init_floor=1e-4, initialize="v0", forward_type="v05_noz")
    first = SS2D(channel_first=True, backend="torch", **kwargs)
    last = SS2D(channel_first=False, backend="torch", **kwargs)
    last.load_state_dict(first.state_dict())
    assert {k: v.shape for k, v in first.state_dict().items()} == {k: v.shape for k, v in last.state_dict().items()}
    x = torch.randn(2, 20, 6, 5)
    assert_close("channel-last SS2D", last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), first(x), rtol=1e-5, atol=1e-6)
    assert first.dt_rank == 2 and first.A_logs.shape == (80, 1) and torch.equal(first.Ds, torch.ones(80))
    sp = F.softplus(first.dt_projs_bias)
    assert sp.min() >= 1e-4 and sp.max() <= 0.1 + 1e-6  # dt in [dt_min, dt_max] after softplus
    with pytest.raises(ValueError, match="forward_type"):
        SS2D(d_model=8, forward_type="v2")
    mem = MemSS2D(d_model=8, d_state=1, ssm_ratio=1.0)
    assert mem.coarse_memory.size == 4 and mem.fine_memory.size == 8


def test_drop_path_only_in_training():
    model = memorymamba.create_model("memorymamba_nano", drop_path_rate=0.5, num_classes=3, depths=[1, 1, 1, 2],
                                     backend="torch")
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        first, second = model(x), model(x)
    # P(two draws of 8 samples x 4 stochastic blocks coincide) is negligible.
    assert (first - second).abs().max() > 1e-6


def test_in_chans_and_backend():
    model = memorymamba.create_model("memorymamba_nano", in_chans=1, num_classes=6, backend="torch")
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 6)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, in_chans=1, H, W\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.randint(0, 255, (2, 1, 64, 64)))
    model.set_backend(None)
    assert all(m.backend is None for m in model.modules() if isinstance(m, SS2D))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("gpu")


@pytest.mark.parametrize("overrides, pattern", [
    (dict(num_layers=3), r"unknown override\(s\) \['num_layers'\]"),
    (dict(dims=[32, 64]), "dims must be a list of 4 positive integers"),
    (dict(dims=0), "dims must be a list of 4 positive integers"),
    (dict(depths=[1, 0, 1, 1]), "depths must be a list of positive integers"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(in_chans=2.0), "in_chans must be a positive integer"),
    (dict(d_state=0), "d_state must be a positive integer"),
    (dict(ssm_ratio=0), "ssm_ratio must be a finite number > 0"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number > 0"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be a number in \[0, 1\)"),
    (dict(use_fusion="yes"), "use_fusion must be True or False"),
    (dict(coarse_memory_size=0), r"coarse_memory_size must be an integer in \[1, 1024\]"),
    (dict(fine_memory_size=2.5), r"fine_memory_size must be an integer in \[1, 1024\]"),
    (dict(similarity="dot"), "similarity must be one of"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(conv_norm="gn"), "conv_norm must be one of"),
])
def test_bad_overrides_name_the_argument(overrides, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        memorymamba.create_model("memorymamba_nano", **overrides)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="name must be one of"):
        memorymamba.create_model("memorymamba_huge")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", None])
def test_model_on_cuda_matches_cpu(backend):
    if not torch.cuda.is_available():  # asked here, not at import, so collection makes no CUDA call
        pytest.skip("needs a CUDA device")
    cpu = memorymamba.create_model("memorymamba_nano", num_classes=4, backend="torch").eval()
    gpu = memorymamba.create_model("memorymamba_nano", num_classes=4, backend=backend).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(3, 3, 45, 38)
    with torch.no_grad():
        expected = cpu(x)
    logits, aux = gpu(x.cuda(), return_aux=True)
    assert_close(f"cuda (backend={backend}) vs cpu logits", logits, expected, rtol=1e-4, atol=1e-4)
    loss, _ = memorymamba.MemoryMambaLoss(class_weight=torch.ones(4))(logits, torch.tensor([0, 1, 3]).cuda(), aux)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(gpu(x.cuda()).float()).all()


def test_cpu_autocast_bf16_forward_backward():
    model = memorymamba.create_model("memorymamba_nano", num_classes=3, depths=[1, 1, 2, 1], backend="torch")
    x = torch.randn(3, 3, 32, 36)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(x, return_aux=True)
        loss, parts = memorymamba.MemoryMambaLoss(lambda_c=1.0, lambda_f=1.0)(logits, torch.tensor([0, 2, 2]), aux)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        print(f"bf16 autocast vs fp32 logits: max abs diff {(logits.float() - model(x)).abs().max().item():.3e}")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_compiled_backend_model_matches_torch(backend):
    device = require_backend(backend, "cross_selective_scan")
    ref = memorymamba.create_model("memorymamba_nano", num_classes=4, depths=[1, 1, 2, 1], backend="torch").eval()
    # backend=None on `device` tensors: the compiled ops where they exist, as users run the model.
    fast = memorymamba.create_model("memorymamba_nano", num_classes=4, depths=[1, 1, 2, 1], backend=None).eval()
    fast.load_state_dict(ref.state_dict())
    fast.to(device)
    x, target = torch.randn(3, 3, 37, 33), torch.tensor([0, 3, 3])
    criterion = memorymamba.MemoryMambaLoss(lambda_c=1.0, lambda_f=1.0)
    grads = []
    for model, dev in ((ref, "cpu"), (fast, device)):
        logits, aux = model(x.to(dev), return_aux=True)
        criterion(logits, target.to(dev), aux)[0].backward()
        grads.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert_close(f"{backend} vs torch logits", grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    worst = max(grads[0][1], key=lambda n: (grads[1][1][n].cpu() - grads[0][1][n]).abs().max().item())
    assert_close(f"{backend} vs torch grad ({worst}, the worst)", grads[1][1][worst], grads[0][1][worst],
                 rtol=1e-3, atol=1e-5)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n].cpu(), g, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
