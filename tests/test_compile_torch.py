"""Layers through torch.compile: `layers.build(..., compile=True)` and `export --compile`.

The compiled module must compute what the plain one does (forward, gradients, running estimates,
train and eval mode) and fall back to the plain forward with exactly one warning where the
compiler fails (forced here by replacing torch.compile).
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from opsearch import cli, layers, torch_compile
from test_export import _load_class, url  # noqa: F401  (the export tests' study fixture)

# x / max(std_b(x), v0*x + rms_b(v0*x)): a layer the default search found (batch statistics)
FOUND = (("std_b", (0,)), ("mul", (2, 0)), ("rms_b", (5,)), ("add", (5, 6)), ("max", (4, 7)),
         ("div", (0, 8)))


@pytest.fixture
def broken_compiler(monkeypatch):
    """torch.compile that fails at the first call, as without a C++ compiler; a fresh flag."""
    calls = []

    def fake_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(fn)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setitem(torch_compile.guard_namespace(), "_TORCH_COMPILE_FAILURE", [])
    # each compiled class keeps the forward torch.compile gave it: classes made with the fake
    # compiler must not outlive the test (they would fail every later test's layers)
    torch_compile._compiled_class.cache_clear()
    yield calls
    torch_compile._compiled_class.cache_clear()


def _pair(name, channels=8):
    plain = layers.build(name, channels)
    compiled = layers.build(name, channels, compile=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.uniform_(0.5, 1.5)
    compiled.load_state_dict(plain.state_dict())
    return plain, compiled


def _step(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def test_same_parameters_and_state_dict_keys():
    plain, compiled = _pair("evonorm_b0")
    assert getattr(type(compiled), "TORCH_COMPILE", False) and isinstance(compiled, type(plain))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert layers.build("evonorm_b0", 8, compile=False).__class__ is plain.__class__


def test_forced_compiler_failure_falls_back_with_one_warning(broken_compiler):
    plain, compiled = _pair("evonorm_b0")
    other = layers.build("evonorm_s0", 8, compile=True)
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(4, 8, 5, 5, generator=gen), torch.randn(4, 8, 5, 5, generator=gen)
    with pytest.warns(RuntimeWarning, match="torch.compile is not available") as record:
        got = _step(compiled, x, grad)
    assert len([w for w in record if "torch.compile" in str(w.message)]) == 1
    assert len(broken_compiler) == 1
    want = _step(plain, x, grad)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled.state_dict(), plain.state_dict())  # running estimate once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no second compile attempt
        other(x)
        compiled.eval()(x)
    assert len(broken_compiler) == 1
    assert isinstance(torch_compile.failure(), RuntimeError)


def test_the_layers_own_errors_are_not_taken_for_compiler_failures(broken_compiler):
    compiled = layers.build("evonorm_s0", 8, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="8 channels"):
            compiled(torch.randn(2, 4, 3, 3))
    assert torch_compile.failure() is None


def test_deepcopy_and_pickle_keep_the_compile_option():
    _, compiled = _pair("evonorm_b0")
    for copied in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        assert getattr(type(copied), "TORCH_COMPILE", False)
        torch.testing.assert_close(copied.state_dict(), compiled.state_dict())


def test_export_compile_is_standalone_and_guarded(url, capsys, broken_compiler):  # noqa: F811
    assert cli.main(["export", url, "--compile"]) == 0
    source = capsys.readouterr().out
    assert "torch.compile" in source
    cls = _load_class(source, "SearchedLayer")  # asserts no opsearch import
    plain_cls = _load_class(source, "SearchedLayerPlain")
    layer, plain = cls(16), plain_cls(16)
    assert list(layer.state_dict()) == list(plain.state_dict())
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 3, 3)
    with pytest.warns(RuntimeWarning, match="torch.compile is not available"):
        y = layer(x)
    torch.testing.assert_close(y, plain(x))
    assert broken_compiler  # the exported class did try torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evonorm_b0", "evonorm_s0", FOUND])
def test_compiled_layer_matches_the_plain_one(name):
    """Real torch.compile (inductor; compiling takes tens of seconds on a small CPU)."""
    plain, compiled = _pair(name)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would pass trivially
        for _ in range(2):  # training: batch statistics and running estimates move
            x = torch.randn(6, 8, 5, 5, generator=gen) * 2 + 0.5
            grad = torch.randn(6, 8, 5, 5, generator=gen)
            got, want = _step(compiled.train(), x, grad), _step(plain.train(), x, grad)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(compiled.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
            compiled.zero_grad()
            plain.zero_grad()
        x = torch.randn(3, 8, 5, 5, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(compiled.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    assert torch_compile.failure() is None
