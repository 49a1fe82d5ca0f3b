"""What a call did, as data a rank can return and the test can judge.

A rank function that expects an error records `outcome(ValueError, fn, *args)` rather than
catching the error into a dict entry: an entry that is only written in the `except` branch is
simply absent when nothing raises, and the test then fails on a `KeyError` far from the cause.
An `Outcome` always exists; the test checks it with `assert_raised`, which matches the message
as `pytest.raises(match=...)` does and, when the call returned instead, says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple


class Outcome(NamedTuple):
    """`Outcome("raised", "ValueError", message)` or `Outcome("returned", None, None)`."""

    kind: str
    error: str | None
    message: str | None


def outcome(expected: type[BaseException] | tuple[type[BaseException], ...],
            call: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    """Run `call(*args, **kwargs)` (the argument order of `pytest.raises`) and record whether
    it raised one of the `expected` exception types, as an `except expected:` clause would
    catch them. Any other exception propagates, so the rank fails and its traceback reaches
    the test through `RankError`."""
    try:
        call(*args, **kwargs)
    except expected as error:
        return Outcome("raised", type(error).__name__, str(error))
    return Outcome("returned", None, None)


def assert_raised(result: Outcome, match: str) -> None:
    """The test side of `outcome`: the call raised, and `re.search(match, message)` finds the
    pattern (pass `re.escape(text)` to look for a literal fragment)."""
    assert result.kind == "raised", f"expected an error matching {match!r}; got {result}"
    assert re.search(match, result.message), \
        f"{result.error}: {result.message!r} does not match {match!r}"
