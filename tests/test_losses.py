"""MemoryMambaLoss and its terms on hand-worked cases (the expected numbers are derived in the comments)."""
import math

import pytest
import torch
import torch.nn.functional as F

import memorymamba
from memorymamba.losses import MemoryMambaLoss, coarse_contrastive_loss, fine_infonce_loss
from memorymamba.model import MemoryAux
from memorymamba.nn import BlockAux


def test_contrastive_three_classes_by_hand():
    # Prototypes: class 0 = mean((1,0), (3,0)) = (2,0); class 1 = (0,2); class 2 = (1,1).
    # cos(p0,p1) = 0, cos(p0,p2) = cos(p1,p2) = 1/sqrt(2). Six ordered pairs, four of them at 1/sqrt(2).
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 0, 2])
    r = 1 / math.sqrt(2)
    cases = [(0.0, 4 * r / 6), (0.5, 4 * (r - 0.5) / 6), (0.8, 0.0), (-0.25, (2 * 0.25 + 4 * (r + 0.25)) / 6)]
    for margin, expected in cases:
        got = coarse_contrastive_loss(h, target, margin).item()
        print(f"margin {margin}: {got:.6f} expected {expected:.6f}")
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_contrastive_pushes_classes_apart():
    # Opposite prototypes satisfy the corrected hinge: zero loss (the printed eq. 23 would give margin + 1).
    h = torch.tensor([[1.0, 0.5], [-2.0, -1.0]])
    assert coarse_contrastive_loss(h, torch.tensor([3, 7])).item() == 0.0
    # Aligned prototypes of different classes are penalised by 1 - margin, and the gradient separates them.
    h = torch.tensor([[1.0, 0.0], [2.0, 0.2]], requires_grad=True)
    loss = coarse_contrastive_loss(h, torch.tensor([0, 1]), margin=0.1)
    cos = 2.0 / math.hypot(2.0, 0.2)
    assert loss.item() == pytest.approx(cos - 0.1, rel=1e-6)
    loss.backward()
    with torch.no_grad():
        stepped = h - 0.1 * h.grad
    assert coarse_contrastive_loss(stepped, torch.tensor([0, 1]), margin=0.1) < loss


def test_contrastive_single_class_is_zero_with_gradient_path():
    h = torch.randn(5, 4, requires_grad=True)
    loss = coarse_contrastive_loss(h, torch.full((5,), 2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_contrastive_matches_pair_loop_on_random_batch():
    h = torch.randn(13, 5)
    target = torch.randint(0, 4, (13,))
    margin = 0.2
    protos = {int(k): h[target == k].mean(0) for k in target.unique()}
    terms = [max(0.0, F.cosine_similarity(protos[a], protos[b], dim=0).item() - margin)
             for a in protos for b in protos if a != b]
    expected = sum(terms) / len(terms)
    got = coarse_contrastive_loss(h, target, margin).item()
    print(f"contrastive loop {expected:.7f} vs {got:.7f}")
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_infonce_two_samples_by_hand():
    # cos(z0,g0) = 1, cos(z0,g1) = 1/sqrt(2), cos(z1,g0) = 0, cos(z1,g1) = 1/sqrt(2); T = 0.5 doubles them.
    # Row 0: -log(e^2 / (e^2 + e^sqrt2)) = log(1 + e^(sqrt2 - 2)); row 1: log(1 + e^(0 - sqrt2)).
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    g = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    s2 = math.sqrt(2)
    expected = (math.log1p(math.exp(s2 - 2)) + math.log1p(math.exp(-s2))) / 2
    got = fine_infonce_loss(z, g, temperature=0.5).item()
    print(f"InfoNCE {got:.7f} expected {expected:.7f}")
    assert got == pytest.approx(expected, rel=1e-6)
    # Temperature 1: logits are the cosines themselves.
    expected_t1 = (math.log1p(math.exp(1 / s2 - 1)) + math.log1p(math.exp(-1 / s2))) / 2
    assert fine_infonce_loss(z, g, temperature=1.0).item() == pytest.approx(expected_t1, rel=1e-6)


def test_infonce_batch_of_one_is_zero_and_identical_readouts_give_log_b():
    assert fine_infonce_loss(torch.randn(1, 6), torch.randn(1, 6)).item() == 0.0
    # Every g the same: each row's logits are equal, the loss is log(B) whatever z is.
    z, g = torch.randn(5, 6), torch.randn(1, 6).expand(5, 6)
    assert fine_infonce_loss(z, g).item() == pytest.approx(math.log(5), rel=1e-6)


def _aux(blocks):
    return MemoryAux(blocks=[BlockAux(*b) for b in blocks])


def test_total_loss_by_hand():
    # CE: logits (0, ln 3) -> p(class 1) = 3/4; logits (ln 2, 0) with target 0 -> p = 2/3.
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    target = torch.tensor([1, 0])
    ce = (-math.log(3 / 4) - math.log(2 / 3)) / 2
    # Block A: coarse prototypes (1,0) and (1,1): cos 1/sqrt(2); margin 0 -> 1/sqrt(2). No fine memory.
    # Block B: coarse prototypes (1,0), (-1,0): 0. Fine: z = g -> diagonal cos 1, off-diagonal 0 for these:
    # each row log(1 + e^(0 - 2)) at T = 0.5.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    aux = _aux([(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), z, None),
                (torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), z, z.clone())])
    contrastive = (1 / math.sqrt(2) + 0.0) / 2  # mean over the two blocks with a coarse memory
    nce = math.log1p(math.exp(-2.0))  # only block B has a fine memory
    loss, parts = MemoryMambaLoss(lambda_c=0.3, lambda_f=0.7)(logits, target, aux)
    print({k: float(v) for k, v in parts.items()}, float(loss))
    assert parts["cls"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["contrastive"].item() == pytest.approx(contrastive, rel=1e-6)
    assert parts["nce"].item() == pytest.approx(nce, rel=1e-6)
    assert loss.item() == pytest.approx(ce + 0.3 * contrastive + 0.7 * nce, rel=1e-6)
    assert not any(v.requires_grad for v in parts.values())


def test_no_memory_is_plain_cross_entropy():
    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    for aux in (None, MemoryAux()):
        loss, parts = MemoryMambaLoss()(logits, target, aux)
        assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
        assert parts["contrastive"].item() == parts["nce"].item() == 0.0


def test_class_weight_and_label_smoothing():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    target = torch.tensor([1, 0])
    # Weighted CE = (w1 * -ln(3/4) + w0 * -ln(2/3)) / (w1 + w0) with w = (1, 3).
    expected = (3 * -math.log(3 / 4) + 1 * -math.log(2 / 3)) / 4
    loss, _ = MemoryMambaLoss(class_weight=torch.tensor([1.0, 3.0]))(logits, target, None)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Smoothing 0.2 over 2 classes: target distribution (0.1, 0.9) for class 1, (0.9, 0.1) for class 0.
    smooth = (-(0.1 * math.log(1 / 4) + 0.9 * math.log(3 / 4)) - (0.9 * math.log(2 / 3) + 0.1 * math.log(1 / 3))) / 2
    loss, _ = MemoryMambaLoss(label_smoothing=0.2)(logits, target, None)
    assert loss.item() == pytest.approx(smooth, rel=1e-6)


def test_loss_trains_the_memory_through_the_model():
    model = memorymamba.create_model("memorymamba_nano", num_classes=3, depths=[1, 1, 1, 1], backend="torch")
    logits, aux = model(torch.randn(4, 3, 32, 32), return_aux=True)
    loss, _ = MemoryMambaLoss(lambda_c=1.0, lambda_f=1.0)(logits, torch.tensor([0, 1, 2, 1]), aux)
    loss.backward()
    op = model.layers[1].blocks[0].op
    for p in (op.coarse_memory.query.fc2.weight, op.fine_memory.proj.fc2.weight, op.fine_memory.cells):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(lambda_c=-0.1), "lambda_c must be >= 0"),
    (dict(lambda_f=float("inf")), "lambda_f must be a finite number"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(margin=1.5), r"margin must be in \[-1, 1\]"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(class_weight=[[1.0, 2.0]]), "class_weight must be a 1-D tensor"),
    (dict(class_weight=[1.0, -2.0]), "class_weight must be a 1-D tensor of finite weights >= 0"),
])
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MemoryMambaLoss(**kwargs)


def test_bad_call_arguments():
    criterion = MemoryMambaLoss()
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"target must be a long tensor of shape \(batch,\) = \(3,\)"):
        criterion(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target must be a long tensor"):
        criterion(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, num_classes\)"):
        criterion(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class_weight must have num_classes = 4 entries"):
        MemoryMambaLoss(class_weight=[1.0, 2.0])(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="z and g must have the same shape"):
        fine_infonce_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"target must have shape \(batch,\) = \(3,\)"):
        coarse_contrastive_loss(torch.randn(3, 4), torch.tensor([0, 1]))


def test_terms_run_in_fp32_under_autocast():
    h = torch.randn(6, 4).bfloat16()
    target = torch.tensor([0, 1, 2, 0, 1, 1])
    z, g = torch.randn(6, 8).bfloat16(), torch.randn(6, 8).bfloat16()
    expected = (coarse_contrastive_loss(h.float(), target), fine_infonce_loss(z.float(), g.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (coarse_contrastive_loss(h, target), fine_infonce_loss(z, g))
    for e, a in zip(expected, got):
        assert a.dtype == torch.float32 and torch.equal(a, e)


def test_contrastive_gradient_is_not_ill_conditioned_at_init():
    # Regression: with 0.02-std query MLPs, |h_c| ~ 1e-4 and the cosine hinge's gradient (~1/|h_c|) on the
    # query MLPs was ~70x the whole CE gradient (250 vs 3.5), so gradient clipping starved the CE signal.
    model = memorymamba.create_model("memorymamba_nano", num_classes=6, backend="torch").eval()
    logits, aux = model(torch.randn(16, 3, 64, 64), return_aux=True)
    target = torch.arange(16) % 6
    params = list(model.parameters())

    def grad_norm(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item()

    ce = grad_norm(F.cross_entropy(logits, target))
    contrastive = grad_norm(torch.stack([coarse_contrastive_loss(h, target) for h in aux.coarse]).mean())
    print(f"gradient norms at init: CE {ce:.3f}, contrastive {contrastive:.3f}")
    assert contrastive < 5 * ce
