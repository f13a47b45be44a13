"""A problem: why a set is Degraded, as its condition (and the Warning Event that announces it) says it."""

from __future__ import annotations

from typing import NamedTuple


class Problem(NamedTuple):
    """``reason``: CamelCase, the condition's and the Event's reason; ``message``: for people.

    A tuple so that a pass can keep the first of several (``problem = problem or found``) and a reader
    can unpack it; named so that every producer (spec, token Secret, trust, storage backoff, the
    apiserver's rejection of a pod) hands the status the same shape.
    """

    reason: str
    message: str
