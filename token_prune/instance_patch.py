"""What the runtime installs on a model instance: wrapped methods and forward hooks that know how
to behave under ``copy.deepcopy``.

A deep copy copies an instance's ``__dict__`` and its hook dictionaries. Plain closures would be
shared by reference, so the copy would keep calling into the *original* module and feeding the
original's runtime (stale vision captures, the wrong weights). The objects here make a deep copy
of a patched model an ordinary, unpatched model instead: a wrapped method copies to the class's
method bound to the copied module, a hook copies to a no-op. Patch the copy if it should prune
too.
"""

from __future__ import annotations

import copy
import inspect
import types
import weakref


class WrappedMethod:
    """``module.<name>`` replaced by ``fn(original, module, *args, **kwargs)`` while the runtime
    lives; the original bound method when it is gone."""

    def __init__(self, module, original, fn, runtime):
        self.module = module
        self.original = original
        self.fn = fn
        self.runtime = weakref.ref(runtime)
        self.__wrapped__ = original
        self.__signature__ = inspect.signature(original)

    def __call__(self, *args, **kwargs):
        if self.runtime() is None:
            return self.original(*args, **kwargs)
        return self.fn(self.original, self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        new = memo.get(id(self.module))
        func = getattr(self.original, "__func__", None)
        if new is None or func is None:
            return copy.deepcopy(self.original, memo)
        return types.MethodType(func, new)


def _inert_hook(*args, **kwargs):
    return None


class InstalledHook:
    """A forward (pre-)hook of the runtime; copies to a hook that does nothing."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _inert_hook


def forward_hook(module, fn, *, with_kwargs: bool = False):
    """``module.register_forward_hook`` with a copy-safe hook; returns the removable handle."""
    return module.register_forward_hook(InstalledHook(fn), with_kwargs=with_kwargs)


def forward_pre_hook(module, fn, *, with_kwargs: bool = False):
    """``module.register_forward_pre_hook`` with a copy-safe hook; returns the removable handle."""
    return module.register_forward_pre_hook(InstalledHook(fn), with_kwargs=with_kwargs)


__all__ = ["WrappedMethod", "InstalledHook", "forward_hook", "forward_pre_hook"]
