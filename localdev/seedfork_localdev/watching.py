"""List, then watch from the list's resourceVersion: the one list+watch loop of the dev harness and its tests.

Objects arrive as the apiserver's JSON (dicts, camelCase), read line by line from the raw response, so a
watch can be ended at once from another thread (``close``) instead of at its next event or timeout.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("seedfork.localdev.watching")


class ListWatch:
    """``list_fn`` (a ``list_namespaced_*`` of the Kubernetes client) as a list and a watch, until stopped.

    ``on_list(items)`` gets every object of each (re)list; ``on_event(type, obj)`` every ADDED, MODIFIED and
    DELETED after it (bookmarks only move the resourceVersion on). An expired watch (410) or a broken one
    lists again, so a consumer that rebuilds its view from ``on_list`` misses nothing.
    """

    def __init__(
        self,
        list_fn: Callable[..., Any],
        *args: Any,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        timeout_seconds: int = 30,
        retry_s: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.list_fn, self.args, self.kwargs = list_fn, args, kwargs
        self.on_list, self.on_event = on_list, on_event
        self.timeout_seconds = timeout_seconds
        self.retry_s = retry_s
        self.stopped = threading.Event()
        self._resp: Any = None

    def run(self) -> None:
        """Blocks until ``close()``."""
        rv = None
        while not self.stopped.is_set():
            try:
                if rv is None:
                    listed = json.loads(self.list_fn(*self.args, **self.kwargs, _preload_content=False).data)
                    rv = listed["metadata"]["resourceVersion"]
                    self.on_list(listed["items"])
                resp = self.list_fn(
                    *self.args,
                    **self.kwargs,
                    watch=True,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self.timeout_seconds,
                    _preload_content=False,
                    _request_timeout=(5, self.timeout_seconds + 15),
                )
                self._resp = resp
                try:
                    rv = self._read(resp, rv)
                finally:
                    self._resp = None
                    resp.release_conn()
            except Exception as exc:
                if self.stopped.is_set():
                    return
                log.warning("watch of %s %s broke (%s); listing again", self.list_fn.__name__, self.args, exc)
                rv = None
                self.stopped.wait(self.retry_s)

    def close(self) -> None:
        """End ``run`` now: also an open watch response, which would otherwise block until its next event."""
        self.stopped.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed by the reading thread
                log.debug("closing the watch response", exc_info=True)

    def _read(self, resp: Any, rv: str | None) -> str | None:
        """Events from the chunked response until it ends; the resourceVersion to go on from (None: list again)."""
        buffer = b""
        for chunk in resp.stream(None, decode_content=False):
            if self.stopped.is_set():
                return rv
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:  # expired: start over from a fresh list
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if event["type"] != "BOOKMARK":
                    self.on_event(event["type"], obj)
        return rv
