"""Compiled layers through torch.compile (inductor), with a guarded fallback to the plain module.

Why: the generated layer is a handful of separate element-wise kernels each way (several times slower
than BatchNorm2d+ReLU on CPU: BENCHMARKS.md, "Layer speed"); inductor fuses them into a few loops. Why guarded: torch.compile needs
a working C++ compiler (CPU) or Triton (GPU) and a supported platform, and fails at the *first
call*, not when it is set up. A layer built with `compile=True` therefore tries the compiled
forward and, on any failure that the plain forward does not also raise, warns once per process and
runs the plain forward from then on: a network always trains, at worst at the plain speed.

The wrapper is source text (`GUARD_SOURCE`, needs only torch) so that `opsearch export --compile`
writes the very same code into the standalone file that `layers.build(..., compile=True)` runs.
Backward runs through the compiled graph too (AOTAutograd compiles forward and backward
together). Where the outer model is itself being compiled (`torch.compiler.is_compiling()`), the
layer runs its plain forward so that the outer compilation traces it.
"""
from __future__ import annotations

import functools
import sys
import types

import torch
from torch import nn

from opsearch.torch_compile_guard import GUARD_SOURCE


@functools.lru_cache(maxsize=1)
def guard_namespace() -> dict:
    """GUARD_SOURCE executed once: one failure flag (one warning) per process."""
    namespace: dict = {"torch": torch, "__name__": "opsearch.torch_compile_guard"}
    exec(compile(GUARD_SOURCE, "<opsearch torch.compile guard>", "exec"), namespace)
    return namespace


def failure() -> BaseException | None:
    """The error that made layers fall back to their plain forward in this process (or None)."""
    found = guard_namespace()["_TORCH_COMPILE_FAILURE"]
    return found[0] if found else None


@functools.lru_cache(maxsize=4096)
def _compiled_class(plain_cls: type) -> type:
    cls = guard_namespace()["_with_torch_compile"](plain_cls, "TorchCompiledLayer")
    cls.__reduce_ex__ = _reduce_ex
    return cls


def _reduce_ex(self, protocol):
    rebuild, args = super(type(self), self).__reduce_ex__(protocol)
    return _rebuild_compiled, (rebuild, args)


def _rebuild_compiled(rebuild, args):
    return torch_compiled(rebuild(*args))


def _register_helper_module() -> None:
    """Dynamo reaches the globals of an inlined function through `sys.modules[__name__]`; the
    generated layers' helpers live in an exec'd namespace named "opsearch.compiled", so give that
    name a module holding the same objects."""
    from opsearch.compile import helper_namespace

    namespace = helper_namespace()
    name = namespace["__name__"]
    if name not in sys.modules:
        module = types.ModuleType(name, "the helpers of opsearch's generated layers")
        module.__dict__.update(namespace)
        sys.modules[name] = module


def torch_compiled(module: nn.Module) -> nn.Module:
    """`module` (a compiled layer) switched in place to its torch.compile'd class; same
    parameters, buffers and state-dict keys, so checkpoints move freely between the two."""
    if getattr(type(module), "TORCH_COMPILE", False):
        return module
    _register_helper_module()
    module.__class__ = _compiled_class(type(module))
    return module


__all__ = ["GUARD_SOURCE", "failure", "guard_namespace", "torch_compiled"]
