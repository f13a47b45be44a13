"""The operator's Kubernetes API client: every call it makes besides kopf's own watches, in one place.

Asynchronous (``kubernetes_asyncio``, on kopf's own event loop: no worker threads), each call bounded by
``timeout`` seconds (a frozen apiserver or a half-open connection ends in an error, not a hung pass).
Answers that only mean "already so" are absorbed here (a pod to delete that is gone: 404); every other
``ApiException`` reaches the caller, which knows what it means for its step. Every patch names its
content type: object patches of built-in kinds merge strategically (a pod's conditions merge by type), the
set's status is a JSON merge patch (custom resources have no strategic merge).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from seedfork_api.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("seedfork.operator")

NODE_TTL = 30.0  # seconds a node's labels are reused: topology changes rarely, scale-outs ask often
POOL_SIZE = 32  # connections: a 100-pod scale-out is ~100 calls at once
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"

__all__ = ["ApiException", "Kube", "api_message"]  # callers catch this client's ApiException, imported from here


class Kube:
    def __init__(self, api: client.ApiClient, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout
        self.core = client.CoreV1Api(api)
        self.objects = client.CustomObjectsApi(api)
        self._nodes: dict[str, tuple[float, dict[str, str]]] = {}

    @classmethod
    async def from_environment(cls, call_timeout: float = 30.0) -> Kube:
        """In-cluster service account, else $KUBECONFIG / ~/.kube/config. Call it on the loop that uses it."""
        from kubernetes_asyncio import config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            kubeconfig = os.environ.get("KUBECONFIG") or None
            await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = POOL_SIZE
        return cls(client.ApiClient(configuration), call_timeout)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        try:
            return await fn(*args, **kwargs)
        except TimeoutError as err:  # the HTTP client's own says nothing: name the call
            raise TimeoutError(f"{fn.__name__} timed out after {kwargs['_request_timeout']}s") from err

    async def close(self) -> None:
        await self.api.close()

    # ------------------------------------------------------------ nodes
    async def node_labels(self, name: str) -> dict[str, str]:
        hit = self._nodes.get(name)
        if hit and time.monotonic() - hit[0] < NODE_TTL:
            return hit[1]
        try:
            node = await self.call(self.core.read_node, name)
            labels = dict(node.metadata.labels or {})
        except ApiException as err:
            # 404: not (yet) a Node; 403: RBAC without nodes — then no topology preference, never a crash.
            log.debug("node %s labels unavailable: %s", name, err.status)
            labels = {}
        self._nodes[name] = (time.monotonic(), labels)
        return labels

    # ------------------------------------------------------------ pods
    async def create_pod(self, namespace: str, pod: Mapping[str, Any]) -> None:
        await self.call(self.core.create_namespaced_pod, namespace, pod)

    async def delete_pod(self, namespace: str, name: str) -> None:
        try:
            await self.call(self.core.delete_namespaced_pod, name, namespace)
        except ApiException as err:
            if err.status != 404:  # 404: gone already
                raise

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.call(self.core.patch_namespaced_pod, name, namespace, patch, _content_type=STRATEGIC)

    async def set_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> bool:
        """Write one condition of the pod's status; False when the pod is gone."""
        try:
            patch = {"status": {"conditions": [condition]}}
            await self.call(self.core.patch_namespaced_pod_status, name, namespace, patch, _content_type=STRATEGIC)
        except ApiException as err:
            if err.status != 404:
                raise
            return False
        return True

    # ------------------------------------------------------------ secrets
    async def read_secret(self, namespace: str, name: str) -> client.V1Secret | None:
        """The Secret, or None when there is none (404)."""
        try:
            return await self.call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            return None

    async def create_secret(self, namespace: str, secret: Mapping[str, Any]) -> None:
        await self.call(self.core.create_namespaced_secret, namespace, secret)

    async def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.call(self.core.patch_namespaced_secret, name, namespace, patch, _content_type=STRATEGIC)

    # ------------------------------------------------------------ the set
    async def patch_set_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self.call(
            self.objects.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type=MERGE,
        )


def api_message(err: ApiException) -> str:
    """The apiserver's own explanation (the Status body's message), else the HTTP reason."""
    try:
        return json.loads(err.body).get("message", err.reason)
    except (TypeError, ValueError):
        return str(err.reason)
