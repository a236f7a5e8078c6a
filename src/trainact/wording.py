"""Errors of :func:`trainact.apply` in the words of an integration that calls it for its user:
the integration's own keywords (``tract_layer=``, ...) in place of ``apply``'s."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


@contextlib.contextmanager
def keywords(names: dict[str, str]) -> Iterator[None]:
    """Inside the block, a ValueError, TypeError or RuntimeError whose message names one of
    ``apply``'s keywords (a key of ``names``, e.g. ``"layer="`` or ``"example_inputs"``) is
    raised again with the caller's words (its value) in their place."""
    words = "|".join(re.escape(k) + ("" if k.endswith("=") else r"\b") for k in names)
    pattern = re.compile(rf"(?<![\w.])({words})")
    try:
        yield
    except (ValueError, TypeError, RuntimeError) as err:
        message = str(err)
        reworded = pattern.sub(lambda m: names[m.group(1)], message)
        if reworded == message or type(err) not in (ValueError, TypeError, RuntimeError):
            raise
        raise type(err)(reworded).with_traceback(err.__traceback__) from None
