"""cross_scan / cross_merge: VMamba's direction order, adjointness, gradients, input checks."""
import pytest
import torch

from conftest import BACKENDS, assert_close, require_backend
from memorymamba.ops import cross_merge, cross_scan

SHAPES = [(1, 1, 1, 1), (2, 3, 3, 5), (1, 2, 5, 3), (2, 1, 7, 4)]


def test_direction_order_on_a_hand_written_map():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None, None]
    xs = cross_scan(x, backend="torch")
    assert xs.shape == (1, 4, 1, 6)
    assert xs[0, :, 0].tolist() == [
        [1, 2, 3, 4, 5, 6],  # row-major
        [1, 4, 2, 5, 3, 6],  # column-major
        [6, 5, 4, 3, 2, 1],  # row-major reversed
        [6, 3, 5, 2, 4, 1],  # column-major reversed
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_merge_is_adjoint_of_scan(backend, shape):
    device = require_backend(backend, "cross_scan")
    B, C, H, W = shape
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    ys = torch.randn(B, 4, C, H * W, dtype=torch.float64, device=device)
    lhs = (cross_scan(x, backend=backend) * ys).sum()
    rhs = (x * cross_merge(ys, H, W, backend=backend)).sum()
    print(f"<scan x, y> = {lhs.item():.12f}, <x, merge y> = {rhs.item():.12f}")
    assert_close("adjoint", lhs, rhs, rtol=1e-12, atol=1e-12)
    # The 5-D layout is the same flat memory.
    assert torch.equal(cross_merge(ys.view(B, 4, C, H, W), backend=backend), cross_merge(ys, H, W, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_of_scan_is_four_times_identity(backend):
    device = require_backend(backend, "cross_scan")
    x = torch.randn(2, 3, 4, 7, device=device)
    assert_close("merge(scan(x))", cross_merge(cross_scan(x, backend=backend), 4, 7, backend=backend), 4 * x,
                 rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_float64(shape):
    B, C, H, W = shape
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(B, 4, C, H * W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, H, W, backend="torch"), (ys,))


BAD = [
    ("scan rank", lambda: cross_scan(torch.randn(2, 3, 4)), ValueError, "x must have shape (B, C, H, W)"),
    ("scan type", lambda: cross_scan([[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("scan int", lambda: cross_scan(torch.ones(1, 1, 2, 2, dtype=torch.long)), TypeError, "x must be a floating-point"),
    ("merge no H W", lambda: cross_merge(torch.randn(1, 4, 2, 6)), ValueError, "H and W must be given"),
    ("merge H*W", lambda: cross_merge(torch.randn(1, 4, 2, 6), 2, 4), ValueError, "ys must have shape (B, 4, C, H*W)"),
    ("merge K", lambda: cross_merge(torch.randn(1, 3, 2, 6), 2, 3), ValueError, "ys must have 4 directions"),
    ("merge rank", lambda: cross_merge(torch.randn(4, 2, 6), 2, 3), ValueError, "ys must have rank 5"),
    ("merge 5d HW", lambda: cross_merge(torch.randn(1, 4, 2, 2, 3), 3, 2), ValueError, "must match ys's last two sizes"),
]


@pytest.mark.parametrize("call,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
