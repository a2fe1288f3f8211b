"""Finiteness checks of the quantizers: immediate ValueError by default, and the deferred mode for
training that keeps the flag on the device (no host sync per weight) and raises once per step."""
import pytest
import torch

from int4_qat.formats import (
    finite_check,
    finite_check_mode,
    get_format,
    nvfp4,
    raise_if_nonfinite,
    set_finite_check,
)

FORMATS = [("int4", 32), ("mxfp4", 32), ("nvfp4", 16)]


@pytest.fixture(autouse=True)
def _clean_flags():
    raise_if_nonfinite.__globals__["_flags"].clear()
    yield
    set_finite_check("raise")
    raise_if_nonfinite.__globals__["_flags"].clear()


class _Synced(Exception):
    pass


@pytest.fixture
def no_sync(monkeypatch):
    """Make every tensor -> Python conversion (what forces a device sync on GPU) raise."""
    def boom(*_a, **_k):
        raise _Synced("host sync")
    for attr in ("__bool__", "item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)


def _weight(bad: float | None, k: int = 64, requires_grad: bool = False) -> torch.Tensor:
    w = torch.randn(4, k, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        w[1, 3] = bad
    return w.requires_grad_(requires_grad)


@pytest.mark.parametrize("fmt,g", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_raise_mode_names_the_tensor(fmt, g, bad):
    assert finite_check_mode() == "raise"
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.experts\.1\.up_proj: .*NaN or Inf"):
        get_format(fmt).fake_quantize(_weight(bad), g, name="layers.3.mlp.experts.1.up_proj")
    with pytest.raises(ValueError, match=r"experts\.2\.down_proj: .*NaN or Inf"):
        get_format(fmt).quantize(_weight(bad), g, name="experts.2.down_proj")


def test_the_sync_guard_catches_a_sync(no_sync):
    # the guard is real: the immediate mode does convert a flag to a Python bool
    with pytest.raises(_Synced):
        get_format("int4").fake_quantize(_weight(None), 32)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_defer_mode_never_syncs_and_raises_once_naming_the_bad_weights(no_sync, monkeypatch,
                                                                       requires_grad):
    with finite_check("defer"):
        for fmt, g in FORMATS:
            f = get_format(fmt)
            f.fake_quantize(_weight(None, requires_grad=requires_grad), g, name=f"{fmt}.good")
            out = f.fake_quantize(_weight(float("nan"), requires_grad=requires_grad), g,
                                  name=f"{fmt}.bad")
            assert out.shape == (4, 64)
            f.fake_quantize(_weight(float("inf")), g, name=f"{fmt}.bad")      # same name again
        w = _weight(None)
        nvfp4.fake_quantize(w, 16, name="nvfp4.shared", global_amax=nvfp4.matrix_amax(w))
        nvfp4.fake_quantize(w, 16, name="nvfp4.too_small", global_amax=nvfp4.matrix_amax(w) / 2)
    assert finite_check_mode() == "raise"
    monkeypatch.undo()  # the once-per-step check itself syncs
    with pytest.raises(ValueError) as err:
        raise_if_nonfinite()
    msg = str(err.value)
    assert msg.startswith("4 quantized weight(s) contain NaN or Inf: ")
    for name in ("int4.bad", "mxfp4.bad", "nvfp4.bad", "nvfp4.too_small (global_amax"):
        assert name in msg
    assert "good" not in msg and "nvfp4.shared" not in msg
    raise_if_nonfinite()  # reported once, then cleared


def test_defer_mode_is_scoped_and_validated():
    with finite_check("defer"):
        assert finite_check_mode() == "defer"
        with pytest.raises(RuntimeError):
            with finite_check("raise"):
                assert finite_check_mode() == "raise"
                raise RuntimeError
        assert finite_check_mode() == "defer"
    assert finite_check_mode() == "raise"
    with pytest.raises(ValueError, match=r"unknown finite-check mode 'later'"):
        set_finite_check("later")
    raise_if_nonfinite()  # nothing flagged: no error
