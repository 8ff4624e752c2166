"""load_vmamba_checkpoint: round trips of VMamba-named state dicts, the report, head resizing, grayscale
stems, bad files, and the memory-off model against VMamba's forward re-composed from a state dict."""
import pytest
import torch
import torch.nn.functional as F

import memorymamba
from memorymamba import ops
from memorymamba.checkpoint import LoadReport
from tests.conftest import assert_close

MEMORY_OFF = dict(use_coarse_memory=False, use_fine_memory=False, use_fusion=False)
# A small VMamba-layout model: nano's size with VMamba's ln2d conv norms (nano's own default is BN).
NANO = dict(dims=24, depths=[1, 2, 1, 1], backend="torch", conv_norm="ln2d")


def vmamba(**kw):
    return memorymamba.create_model("memorymamba_nano", **{**NANO, **MEMORY_OFF, **kw})


def memory_model(**kw):
    return memorymamba.create_model("memorymamba_nano", **{**NANO, **kw})


class PickledConfig:
    """Stands in for the yacs config VMamba's training checkpoints pickle beside the weights."""

    depth = 8


def _ln2d(x, sd, key):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[key + ".weight"], sd[key + ".bias"])
    return y.permute(0, 3, 1, 2)


def _linear2d(x, weight, bias=None):
    return torch.einsum("oc,bchw->bohw", weight, x) + (0 if bias is None else bias[:, None, None])


def vmamba_forward(sd, x, depths):
    """VMamba vmambav2v (v05_noz, ln2d) classification forward written from a state dict with the reference ops."""
    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
    x = F.gelu(_ln2d(x, sd, "patch_embed.2"))
    x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
    x = _ln2d(x, sd, "patch_embed.7")
    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            h = _linear2d(_ln2d(x, sd, b + "norm"), sd[b + "op.in_proj.weight"])
            h = F.conv2d(h, sd[b + "op.conv2d.weight"], padding=1, groups=h.shape[1])
            h = ops.cross_selective_scan_ref(F.silu(h), sd[b + "op.x_proj_weight"], sd[b + "op.dt_projs_weight"],
                                             sd[b + "op.dt_projs_bias"], sd[b + "op.A_logs"], sd[b + "op.Ds"])
            x = x + _linear2d(_ln2d(h, sd, b + "op.out_norm"), sd[b + "op.out_proj.weight"])
            h = F.gelu(_linear2d(_ln2d(x, sd, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            x = x + _linear2d(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        if i < len(depths) - 1:
            d = f"layers.{i}.downsample."
            x = _ln2d(F.conv2d(x, sd[d + "1.weight"], sd[d + "1.bias"], stride=2, padding=1), sd, d + "3")
    x = _ln2d(x, sd, "classifier.norm").mean(dim=(2, 3))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


def _perturbed_state_dict(model):
    """The model's state dict with every tensor moved off its init (LayerNorms are 1/0 there)."""
    return {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}


def test_memory_off_model_computes_vmamba_forward():
    sd = _perturbed_state_dict(vmamba(num_classes=7))
    model = memory_model(num_classes=7, **MEMORY_OFF)
    report = memorymamba.load_vmamba_checkpoint(model, {"model": sd})
    assert not (report.missing or report.unexpected or report.resized or report.fresh)
    x = torch.randn(2, 3, 41, 35)
    with torch.no_grad():
        assert_close("memory-off MemoryMamba vs VMamba re-composition", model.eval()(x),
                     vmamba_forward(sd, x, NANO["depths"]), rtol=1e-4, atol=1e-5)


def test_round_trip_into_memory_model_and_report():
    sd = _perturbed_state_dict(vmamba(num_classes=7))
    model = memory_model(num_classes=7)
    fresh_before = {k: v.clone() for k, v in model.state_dict().items() if "_memory." in k}
    report = memorymamba.load_vmamba_checkpoint(model, {"model": sd, "epoch": 3})
    own = model.state_dict()
    assert sorted(report.loaded) == sorted(sd)
    assert sorted(report.fresh) == sorted(fresh_before) and fresh_before
    assert report.missing == report.unexpected == report.resized == report.adapted == []
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    for k, v in fresh_before.items():
        assert torch.equal(own[k], v), k
    text = str(report)
    print(text)
    assert f"loaded {len(sd)} of {len(own)} model tensors" in text
    assert "layers.0.blocks.0.op.coarse_memory" in text and "unexpected: none" in text


def test_other_head_size_and_unexpected_key(tmp_path):
    sd = _perturbed_state_dict(vmamba(num_classes=1000))
    sd["pos_embed"] = torch.randn(1, 24, 8, 8)
    path = tmp_path / "vmamba.pth"
    torch.save({"model": sd, "max_accuracy": 80.1}, path)
    model = memory_model(num_classes=6)
    head_before = model.classifier.head.weight.detach().clone()
    report = memorymamba.load_vmamba_checkpoint(model, str(path))
    print(report)
    assert report.resized == ["classifier.head.weight: (1000, 192) -> (6, 192)",
                              "classifier.head.bias: (1000,) -> (6,)"]
    assert report.unexpected == ["pos_embed"] and report.missing == []
    assert sorted(report.loaded) == sorted(k for k in sd if not k.startswith(("classifier.head", "pos_embed")))
    assert torch.equal(model.classifier.head.weight, head_before)
    assert torch.equal(model.classifier.norm.weight, sd["classifier.norm.weight"])


def test_bare_state_dict_prefixes_missing_and_conv_shaped_linears():
    sd = _perturbed_state_dict(vmamba(num_classes=5))
    dropped = "layers.3.blocks.0.mlp.fc1.bias"
    ddp = {"module." + k: v for k, v in sd.items() if k != dropped}
    key = "layers.1.blocks.1.op.in_proj.weight"
    ddp["module." + key] = sd[key][:, :, None, None]  # a checkpoint whose Linear2d was saved as a 1x1 conv
    model = memory_model(num_classes=5, **MEMORY_OFF)
    report = memorymamba.load_vmamba_checkpoint(model, ddp)
    assert report.missing == [dropped] and report.unexpected == []
    assert torch.equal(model.state_dict()[key], sd[key])


def test_grayscale_stem_is_adapted_from_rgb():
    sd = _perturbed_state_dict(vmamba(num_classes=4))
    rgb = vmamba(num_classes=4)
    rgb.load_state_dict(sd)
    gray = vmamba(num_classes=4, in_chans=1)
    report = memorymamba.load_vmamba_checkpoint(gray, sd)
    assert report.adapted == ["patch_embed.0.weight: (12, 3, 3, 3) -> (12, 1, 3, 3)"]
    x = torch.randn(2, 1, 32, 36)
    with torch.no_grad():
        assert_close("gray model vs RGB model on replicated gray", gray.eval()(x), rgb.eval()(x.expand(2, 3, 32, 36)),
                     rtol=1e-4, atol=1e-5)


def test_other_architecture_is_refused():
    sd = vmamba(dims=32).state_dict()
    with pytest.raises(ValueError, match=r"another architecture.*patch_embed\.0\.weight: checkpoint \(16, 3, 3, 3\) "
                                         r"vs model \(12, 3, 3, 3\)"):
        memorymamba.load_vmamba_checkpoint(memory_model(), sd)


def test_pickled_objects_need_trusted(tmp_path):
    sd = vmamba(num_classes=3).state_dict()
    path = tmp_path / "with_config.pth"
    torch.save({"model": sd, "config": PickledConfig()}, path)
    model = memory_model(num_classes=3)
    with pytest.raises(ValueError, match="pass trusted=True"):
        memorymamba.load_vmamba_checkpoint(model, path)
    report = memorymamba.load_vmamba_checkpoint(model, path, trusted=True)
    assert isinstance(report, LoadReport) and len(report.loaded) == len(sd)


def test_bad_inputs():
    model = memory_model()
    with pytest.raises(TypeError, match="path_or_dict must be a path or a dict, got int"):
        memorymamba.load_vmamba_checkpoint(model, 3)
    with pytest.raises(ValueError, match="'epoch' is a int"):
        memorymamba.load_vmamba_checkpoint(model, {"epoch": 3})


def test_memorymamba_checkpoint_loads_its_memory():
    src = memory_model(num_classes=3, coarse_memory_size=5)
    sd = _perturbed_state_dict(src)
    same = memory_model(num_classes=3, coarse_memory_size=5)
    report = memorymamba.load_vmamba_checkpoint(same, sd)
    assert sorted(report.loaded) == sorted(sd) and report.fresh == [] and report.resized == []
    assert all(torch.equal(v, sd[k]) for k, v in same.state_dict().items())
    other = memory_model(num_classes=3, coarse_memory_size=4)
    report = memorymamba.load_vmamba_checkpoint(other, sd)
    resized = {r.split(":")[0] for r in report.resized}
    assert resized == {k for k in sd if k.endswith(("coarse_memory.cells", "coarse_memory.query.fc2.weight",
                                                    "coarse_memory.query.fc2.bias"))}
    assert "layers.0.blocks.0.op.coarse_memory.cells: (5, 24) -> (4, 24)" in report.resized
