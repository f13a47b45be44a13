"""One ModelReplicaSet through the API: create, scale (through the scale subresource), read its pods, wait."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from seedfork_api import contract as c
from seedfork_api.spec import GROUP, PLURAL, VERSION

from .pods import PodRow
from .waiting import ScenarioError, wait_until


class ReferenceSet:
    """One ModelReplicaSet in one namespace: create, scale (through the scale subresource), read its pods."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.name = name

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, dict(body))

    def get(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    def scale(self, replicas: int) -> dict[str, Any]:
        """What ``kubectl scale`` or an HPA does: write spec.replicas through the scale subresource."""
        return self.custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, self.namespace, PLURAL, self.name, {"spec": {"replicas": replicas}}
        )

    def read_scale(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object_scale(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def pods(self) -> list[dict[str, Any]]:
        got = self.core.list_namespaced_pod(self.namespace, label_selector=f"{c.LABEL_SET}={self.name}")
        return [client.ApiClient().sanitize_for_serialization(p) for p in got.items]

    def rows(self) -> list[PodRow]:
        return sorted((PodRow.from_pod(p) for p in self.pods()), key=lambda r: r.name)

    def token(self) -> str:
        """The bearer token guarding the weight and engine endpoints (the operator's Secret)."""
        import base64

        secrets = self.core.list_namespaced_secret(self.namespace, label_selector=f"{c.LABEL_SET}={self.name}")
        for secret in secrets.items:
            data = secret.data or {}
            if c.TOKEN_SECRET_KEY in data:
                return base64.b64decode(data[c.TOKEN_SECRET_KEY]).decode()
        raise ScenarioError(f"no token Secret for set {self.name} in {self.namespace}")

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)

    def wait_ready(
        self,
        replicas: int,
        timeout: float,
        on_poll: Callable[[list[PodRow]], None] | None = None,
        interval: float = 0.25,
        standby: int | None = None,
    ) -> list[PodRow]:
        """Until exactly ``replicas`` live replica pods exist and all are Ready (and, with ``standby``, exactly
        that many warm standbys besides); returns the replicas' rows. Standby pods are no replicas."""

        def check() -> tuple[list[PodRow]] | None:
            live = [r for r in self.rows() if not r.deleting]
            rows = [r for r in live if not r.standby]
            if on_poll:
                on_poll(rows)
            failed = [r for r in rows if r.phase == "Failed"]
            if failed:
                raise ScenarioError(f"pod {failed[0].name} failed:\n{self.describe()}")
            spares = [r for r in live if r.standby]
            if standby is not None and not (len(spares) == standby and all(r.warm for r in spares)):
                return None
            if len(rows) == replicas and all(r.ready for r in rows):
                return (rows,)  # truthy also when no pods are wanted
            return None

        what = f"{replicas} Ready pods of {self.name}" + (f" and {standby} warm standbys" if standby else "")
        (rows,) = wait_until(check, timeout, what, interval, self.describe)
        return rows

    def describe(self) -> str:
        """A compact dump for failure messages: each pod's phase, conditions, assignment and report."""
        lines = []
        try:
            status = self.status()
            lines.append(f"set {self.name}: status {json.dumps(status, sort_keys=True)[:800]}")
        except ApiException as e:
            lines.append(f"set {self.name}: {e.status} {e.reason}")
        for row in self.rows():
            lines.append(
                f"  pod {row.name} node={row.node} ip={row.ip} phase={row.phase} ready={row.ready} gate={row.gate} "
                f"deleting={row.deleting} assignment={json.dumps(row.assignment)} report={json.dumps(row.report)}"
            )
        return "\n".join(lines)
