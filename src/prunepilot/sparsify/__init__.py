"""LLM sparsity: calibration, sensitivity profile, plans, strategists (built-in and LLM), loop, export, run.

`prunepilot.sparsify` is both this package and the Python API function: once any `prunepilot.sparsify.*` module
is imported, Python binds the package itself to the attribute `prunepilot.sparsify`, shadowing the lazily
exported function. So the package is callable and calls the API: `prunepilot.sparsify(model, tok, ...)` works
however many times it is called and whatever was imported before."""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api.sparsify import sparsify

        return sparsify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
