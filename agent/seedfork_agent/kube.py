"""The agent's only Kubernetes I/O: read its own pod, patch its annotations, post Events, watch it.

Asynchronous (``kubernetes_asyncio``), so a watch is a coroutine of the pod loop that a newer assignment or a
shutdown cancels at once, instead of a worker thread blocked in a read that nothing can interrupt.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client, config, watch

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

    async def annotations(self) -> tuple[dict[str, str], str]:
        """The pod's annotations and its resourceVersion."""
        pod = await self.core.read_namespaced_pod(self.name, self.namespace, _request_timeout=30)
        return dict(pod.metadata.annotations or {}), pod.metadata.resource_version

    async def containers(self, exclude: str) -> dict[str, tuple[int, bool]]:
        """Each container's (restart count, terminated now) but ``exclude``'s, from the pod's status."""
        pod = await self.core.read_namespaced_pod(self.name, self.namespace, _request_timeout=10)
        out = {}
        for s in pod.status.container_statuses or []:
            if s.name != exclude:
                out[s.name] = (int(s.restart_count or 0), bool(s.state and s.state.terminated))
        return out

    async def report(self, report: AgentReport, timing: PodTiming | None = None) -> None:
        values: dict[str, Any] = {"report": report}
        if timing is not None:
            values["timing"] = timing
        patch = annotation_patch(**values)
        await self.core.patch_namespaced_pod(self.name, self.namespace, patch, _request_timeout=30)

    async def event(self, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on this pod (``kubectl describe pod`` shows it), e.g. a skipped engine cache."""
        now = datetime.now(UTC)
        pod = await self.core.read_namespaced_pod(self.name, self.namespace, _request_timeout=10)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{self.name}.", namespace=self.namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", name=self.name, namespace=self.namespace, uid=pod.metadata.uid
            ),
            type=kind,
            reason=reason,
            message=message[:1000],
            source=client.V1EventSource(component="seedfork-agent"),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        await self.core.create_namespaced_event(self.namespace, body, _request_timeout=10)

    async def watch(self, resource_version: str, timeout_s: int = 60) -> AsyncIterator[dict[str, str]]:
        """Annotations of each change to the pod after ``resource_version``, until the watch times out.
        Closing the iterator (or cancelling its reader) closes the connection."""
        async with watch.Watch() as w:
            async for event in w.stream(
                self.core.list_namespaced_pod,
                self.namespace,
                field_selector=f"metadata.name={self.name}",
                resource_version=resource_version,
                timeout_seconds=timeout_s,
                _request_timeout=timeout_s + 10,
            ):
                yield dict(event["object"].metadata.annotations or {})

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
