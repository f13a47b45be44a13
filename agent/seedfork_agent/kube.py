"""The agent's only Kubernetes I/O: read its own pod, patch its annotations, post Events, watch it.

Asynchronous (``kubernetes_asyncio``), so a watch is a coroutine of the pod loop that a newer assignment or a
shutdown cancels at once, instead of a worker thread blocked in a read that nothing can interrupt.

Answers are read as JSON, never decoded into the client's models, and a watch reads its stream itself
rather than through ``kubernetes_asyncio.watch.Watch``: each ``Watch`` builds an API client of its own only to
decode events, and with it a TLS context that loads the system's CA certificates, 40 ms of the loop's CPU on
every watch. The loop watches again at each attempt's start and end, which is when a promoted standby's
transfer, engine proof and report are on that same loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from seedfork_api.contract import AgentReport, PodTiming, annotation_patch


class PodClient:
    core: client.CoreV1Api  # set by open()

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self._api: client.ApiClient | None = None

    async def open(self) -> None:
        """Connect: before any other call, on the loop that makes them (reading a kubeconfig is a coroutine)."""
        if os.environ.get("KUBECONFIG"):
            self._api = await config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
        else:
            config.load_incluster_config()
            self._api = client.ApiClient()
        self.core = client.CoreV1Api(self._api)

    async def _pod(self, timeout_s: float) -> dict[str, Any]:
        return await _json(self.core.read_namespaced_pod(self.name, self.namespace, **_raw(timeout_s)))

    async def annotations(self) -> tuple[dict[str, str], str]:
        """The pod's annotations and its resourceVersion."""
        meta = (await self._pod(30)).get("metadata") or {}
        return dict(meta.get("annotations") or {}), meta["resourceVersion"]

    async def containers(self, exclude: str) -> dict[str, tuple[int, bool]]:
        """Each container's (restart count, terminated now) but ``exclude``'s, from the pod's status."""
        status = (await self._pod(10)).get("status") or {}
        out = {}
        for s in status.get("containerStatuses") or []:
            if s["name"] != exclude:
                out[s["name"]] = (int(s.get("restartCount") or 0), bool((s.get("state") or {}).get("terminated")))
        return out

    async def report(self, report: AgentReport, timing: PodTiming | None = None) -> None:
        values: dict[str, Any] = {"report": report}
        if timing is not None:
            values["timing"] = timing
        patch = annotation_patch(**values)
        await _json(self.core.patch_namespaced_pod(self.name, self.namespace, patch, **_raw(30)))

    async def event(self, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on this pod (``kubectl describe pod`` shows it), e.g. a skipped engine cache."""
        now = datetime.now(UTC)
        uid = (await self._pod(10))["metadata"]["uid"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{self.name}.", namespace=self.namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", name=self.name, namespace=self.namespace, uid=uid
            ),
            type=kind,
            reason=reason,
            message=message[:1000],
            source=client.V1EventSource(component="seedfork-agent"),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        await _json(self.core.create_namespaced_event(self.namespace, body, **_raw(10)))

    async def watch(self, resource_version: str, timeout_s: int = 60) -> AsyncIterator[dict[str, str]]:
        """Annotations of each change to the pod after ``resource_version``, until the watch times out.
        An error the apiserver sends in the stream (410: that version is gone) raises ``ApiException``.
        Closing the iterator (or cancelling its reader) closes the connection."""
        resp = await self.core.list_namespaced_pod(
            self.namespace,
            field_selector=f"metadata.name={self.name}",
            resource_version=resource_version,
            watch=True,
            timeout_seconds=timeout_s,
            **_raw(timeout_s + 10),
        )
        try:
            await _raise_for_status(resp)
            async for line in resp.content:  # one event per line; the stream ends when the watch times out
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
                if event.get("type") != "BOOKMARK":
                    yield dict((obj.get("metadata") or {}).get("annotations") or {})
        finally:
            resp.close()  # a stream left mid-way is no connection to reuse

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()


def _raw(timeout_s: float) -> dict[str, Any]:
    """A call's keywords for its bare answer: the caller reads the JSON (``_json``)."""
    return {"_request_timeout": timeout_s, "_preload_content": False}


async def _json(call: Awaitable[Any]) -> dict[str, Any]:
    """The JSON answer of a call made with ``_raw``."""
    resp = await call
    async with resp:
        await _raise_for_status(resp)
        return json.loads(await resp.read())


async def _raise_for_status(resp: Any) -> None:
    """An error status of a bare answer raises ``ApiException`` as a decoded call would (the client checks the
    status only when it decodes the answer)."""
    if not 200 <= resp.status <= 299:
        raise ApiException(status=resp.status, reason=f"{resp.reason}: {(await resp.text(errors='replace'))[:300]}")
