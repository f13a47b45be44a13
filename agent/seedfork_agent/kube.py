"""The agent's only Kubernetes I/O: read its own pod, patch its annotations, watch it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, watch

from seedfork_api.contract import AgentReport, PodTiming, annotation_patch


class PodClient:
    def __init__(self, name: str, namespace: str) -> None:
        if os.environ.get("KUBECONFIG"):
            api = config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
        else:
            config.load_incluster_config()
            api = client.ApiClient()
        self._api = api
        self.core = client.CoreV1Api(api)
        self.name = name
        self.namespace = namespace

    def annotations(self) -> tuple[dict[str, str], str]:
        """The pod's annotations and its resourceVersion."""
        pod = self.core.read_namespaced_pod(self.name, self.namespace, _request_timeout=30)
        return dict(pod.metadata.annotations or {}), pod.metadata.resource_version

    def containers(self, exclude: str) -> dict[str, tuple[int, bool]]:
        """Each container's (restart count, terminated now) but ``exclude``'s, from the pod's status."""
        pod = self.core.read_namespaced_pod(self.name, self.namespace, _request_timeout=10)
        out = {}
        for s in pod.status.container_statuses or []:
            if s.name != exclude:
                out[s.name] = (int(s.restart_count or 0), bool(s.state and s.state.terminated))
        return out

    def report(self, report: AgentReport, timing: PodTiming | None = None) -> None:
        values: dict[str, Any] = {"report": report}
        if timing is not None:
            values["timing"] = timing
        self.core.patch_namespaced_pod(self.name, self.namespace, annotation_patch(**values), _request_timeout=30)

    def event(self, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on this pod (``kubectl describe pod`` shows it), e.g. a skipped engine cache."""
        now = datetime.now(UTC)
        pod = self.core.read_namespaced_pod(self.name, self.namespace, _request_timeout=10)
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
        self.core.create_namespaced_event(self.namespace, body, _request_timeout=10)

    def watch(self, resource_version: str, timeout_s: int = 60) -> Iterator[dict[str, str]]:
        """Annotations of each change to the pod, until the watch times out."""
        w = watch.Watch()
        for event in w.stream(
            self.core.list_namespaced_pod,
            self.namespace,
            field_selector=f"metadata.name={self.name}",
            resource_version=resource_version,
            timeout_seconds=timeout_s,
            _request_timeout=timeout_s + 10,
        ):
            obj = event["object"]
            yield dict(obj.metadata.annotations or {})

    def close(self) -> None:
        self._api.close()
