"""A c10d store whose waits can be ended from outside: how a group creation stays bounded and abortable.

Building a gloo/NCCL group blocks in store waits (each rank waits for the others' addresses) for up to the
store's timeout, inside C++ where nothing in Python can interrupt it. ``AbortableStore`` forwards every call
to the real store but slices each wait into short ones and asks ``abort`` between them, so a member that
died, a group that expired or a newer assignment ends the creation within a slice. ``close`` drops the real
store: on rank 0 that closes the listener, and every member blocked on it fails at once ("connection
closed") instead of waiting out its own timeout.

The keys are those of the wrapped store, unchanged, so peers that use a plain store (stock SGLang) meet ours.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

_SLICE_S = 0.5


class JoinAborted(RuntimeError):
    """A group creation ended because ``abort`` gave a reason (the seed refused, a member died, it expired)."""


class AbortableStore(dist.Store):
    def __init__(self, store: dist.Store, abort: Callable[[], str | None], timeout_s: float) -> None:
        super().__init__()
        self._store: dist.Store | None = store
        self._abort = abort
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    def close(self) -> None:
        """Drop the real store (rank 0: stop listening); later calls raise."""
        with self._lock:
            self._store = None

    def _real(self) -> dist.Store:
        reason = self._abort()
        if reason:
            raise JoinAborted(reason)
        store = self._store
        if store is None:
            raise JoinAborted("the group's store was closed")
        return store

    # ---- the calls a group creation makes, forwarded
    def set(self, key, value):
        return self._real().set(key, value)

    def get(self, key):
        self.wait([key])  # a plain get blocks for the whole timeout while the key is missing
        return self._real().get(key)

    def add(self, key, value):
        return self._real().add(key, value)

    def check(self, keys):
        return self._real().check(keys)

    def compare_set(self, key, expected, desired):
        return self._real().compare_set(key, expected, desired)

    def delete_key(self, key):
        return self._real().delete_key(key)

    def num_keys(self):
        return self._real().num_keys()

    def set_timeout(self, timeout):
        self._timeout_s = timeout.total_seconds()
        return self._real().set_timeout(timeout)

    def wait(self, keys, timeout=None):
        limit = timeout.total_seconds() if timeout is not None else self._timeout_s
        deadline = time.monotonic() + limit
        while True:
            store = self._real()
            try:
                store.wait(keys, timedelta(seconds=max(0.01, min(_SLICE_S, deadline - time.monotonic()))))
                return
            except JoinAborted:
                raise
            except Exception as e:
                self._real()  # an abort that came during the slice wins over the timeout it caused
                if time.monotonic() >= deadline or "timeout" not in str(e).lower():
                    raise
