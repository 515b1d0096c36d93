"""Comparing compiled results with eager, shared by the test files."""
from __future__ import annotations

from nlcompile.numerics import relative_error as rel_err

__all__ = ["rel_err", "as_tuple", "assert_close_outputs"]


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_close_outputs(got, want, tol=1e-4):
    """Same structure, shapes and dtypes; every tensor within ``tol`` relative to its scale."""
    got, want = as_tuple(got), as_tuple(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        assert rel_err(g, w) <= tol, rel_err(g, w)
