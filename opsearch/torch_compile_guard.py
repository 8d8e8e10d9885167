"""The torch.compile guard as source text (needs only torch): `torch_compile` runs it for
`layers.build(..., compile=True)` and `compile.export_source` writes the very same text into
standalone files, so both share it from this leaf instead of importing each other."""
from __future__ import annotations

GUARD_SOURCE = '''
import warnings as _warnings

_TORCH_COMPILE_FAILURE = []  # the first failure of torch.compile in this process, if any


def _torch_compile_failed(error):
    if not _TORCH_COMPILE_FAILURE:
        _TORCH_COMPILE_FAILURE.append(error)
        text = " ".join(str(error).split())[:300]
        _warnings.warn(f"torch.compile is not available here ({type(error).__name__}: {text}); "
                       "layers run their plain PyTorch forward", RuntimeWarning, stacklevel=3)


def _with_torch_compile(plain_cls, name):
    """Subclass of `plain_cls` whose forward (and so backward) runs through torch.compile."""
    plain_forward = plain_cls.forward
    compiled = []

    def forward(self, x):
        if (_TORCH_COMPILE_FAILURE or torch.compiler.is_compiling() or x.dim() != 4
                or x.shape[1] != self.num_channels):
            return plain_forward(self, x)  # also raises the plain module's input errors
        try:
            if not compiled:
                compiled.append(torch.compile(plain_forward))
            return compiled[0](self, x)
        except Exception as error:  # the compiler failed, or the layer itself does
            out = plain_forward(self, x)  # the layer's own error propagates from here
            _torch_compile_failed(error)
            return out

    forward.__doc__ = plain_forward.__doc__
    return type(name, (plain_cls,), {"forward": forward, "__qualname__": name,
                                     "__module__": plain_cls.__module__, "TORCH_COMPILE": True})
'''
