"""Backend resolution: env var, unknown names, unavailable backends, the rule for unwritten kernels."""
import pytest
import torch

from memorymamba import _backend
from memorymamba._backend import ENV_VAR, BackendUnavailableError, resolve, unavailable_reason
from memorymamba.ops import _dispatch, memory_attention


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_cuda_unavailable_here_says_why():
    reason = unavailable_reason("cuda")
    if reason is None:
        pytest.skip("CUDA kernels run here")
    with pytest.raises(BackendUnavailableError) as info:
        resolve("cuda", torch.randn(2))
    assert "backend='cuda' is unavailable" in str(info.value) and reason in str(info.value)


def test_torch_always_available():
    assert unavailable_reason("torch") is None
    assert resolve("torch", torch.randn(2)) == "torch"


def test_none_picks_kernels_for_the_device_when_built_else_torch():
    expected = "cpu" if unavailable_reason("cpu") is None else "torch"
    assert resolve(None, torch.randn(2)) == expected


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve(None, torch.randn(2)) == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    if unavailable_reason("cuda") is None:
        pytest.skip("CUDA kernels run here")
    with pytest.raises(BackendUnavailableError) as info:
        resolve(None, torch.randn(2))
    assert f"{ENV_VAR}='cuda' is unavailable" in str(info.value)


def test_explicit_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    assert resolve("torch", torch.randn(2)) == "torch"


@pytest.mark.parametrize("where", ["argument", "env"])
def test_unknown_backend_names_the_allowed_ones(monkeypatch, where):
    if where == "env":
        monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError) as info:
        resolve("triton" if where == "argument" else None, torch.randn(2))
    assert "'triton' is not a backend" in str(info.value) and "('torch', 'cpu', 'cuda')" in str(info.value)
    assert "unknown backend 'triton'" in unavailable_reason("triton")


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="one device"):
        resolve(None, torch.randn(2), torch.randn(2, device="meta"))


def test_op_without_kernel_rule(monkeypatch):
    """An op with no compiled kernel runs on torch under backend=None; an explicit kernel backend raises."""
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, *tensors: backend or "cpu")
    assert _dispatch.pick_backend("cross_scan", None, torch.randn(2)) == "torch"
    with pytest.raises(BackendUnavailableError) as info:
        _dispatch.pick_backend("cross_scan", "cpu", torch.randn(2))
    assert "cross_scan" in str(info.value) and "no compiled kernel" in str(info.value)
    assert _dispatch.pick_backend("memory_attention", None, torch.randn(2)) == "cpu"


def test_kernel_lookup_is_traceable():
    """kernel() is a plain attribute lookup, so torch.compile(fullgraph=True) of a public op has no break."""
    for op in _dispatch.KERNEL_OPS:
        assert callable(_dispatch.kernel(op))
    u = torch.randn(1, 2, 5)
    fn = torch.compile(lambda u: _dispatch.kernel("selective_scan"), fullgraph=True, backend="eager")
    assert fn(u) is _dispatch.kernel("selective_scan")


def test_memory_attention_runs_with_default_backend():
    """The model's default call must work whatever kernels are built."""
    w, h, v = memory_attention(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4), torch.randn(5, 4),
                               torch.randn(5), torch.randn(5, 3))
    assert w.shape == (2, 3) and h.shape == (2, 5) and v.shape == (2, 3)


def test_extension_raises_with_reason_when_missing():
    if _backend._C is not None:
        assert _backend.extension() is _backend._C
    else:
        with pytest.raises(BackendUnavailableError, match="memorymamba._C"):
            _backend.extension()
