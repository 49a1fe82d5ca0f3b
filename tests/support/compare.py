"""Comparisons for the test side, whose failures say what differed and where.

Rank functions return the evidence (tensors, numbers, messages); the test compares it here
instead of asserting a boolean the rank computed, which would fail as a bare `assert False`.
"""

from __future__ import annotations

from typing import Any

import torch


def assert_same(actual: Any, expected: Any, what: str = "") -> None:
    """Bit for bit equal (what `torch.equal` checks, dtype included): tensors, or dicts and
    lists of them. A failure names `what`, the item and the largest difference; dicts must
    have the same keys."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0,
                               msg=lambda message: f"{what}: {message}" if what else message)


def identity(obj: Any) -> tuple[str, int]:
    """`a is b` as data a rank can return: objects do not survive the trip to the test process
    as themselves, so the rank returns `identity(a)` and `identity(b)` and the test compares
    them (a failure shows the two types)."""
    return type(obj).__name__, id(obj)
