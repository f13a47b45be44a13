"""The operator's Kubernetes API client: every call it makes besides kopf's own watches, in one place.

Blocking kubernetes-client calls, run in worker threads, each bounded by ``timeout`` seconds (a frozen
apiserver or a half-open connection ends in an error, not a hung pass). Answers that only mean "already
so" are absorbed here (a pod to delete that is gone: 404); every other ``ApiException`` reaches the caller,
which knows what it means for its step.

Why threads and not an asyncio client: ``kubernetes_asyncio`` (the same generated API on aiohttp) was
tried here and made the 1→100 scale-out slower on a loaded two-core machine (``bench/operator_bench.py``:
every pod assigned after 4.0-9.3 s, median 6.4 s, in six runs, against 3.6-6.0 s, median 4.4 s, in
eight runs of this client, at the same load, partly interleaved). The likely cause: on kopf's loop,
decoding each response into models holds the one thread that also sends the next request and handles
kopf's watches; in threads they interleave. The workaround the threads need is one line
(``handlers.configure`` gives the loop an executor of ``POOL_SIZE`` threads); revisit when a measurement
says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from seedfork_api.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("seedfork.operator")

NODE_TTL = 30.0  # seconds a node's labels are reused: topology changes rarely, scale-outs ask often
POOL_SIZE = 32  # connections (and threads, see handlers.configure): a 100-pod scale-out is ~100 calls at once


class Kube:
    def __init__(self, api: client.ApiClient, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout
        self.core = client.CoreV1Api(api)
        self.objects = client.CustomObjectsApi(api)
        self._nodes: dict[str, tuple[float, dict[str, str]]] = {}

    @classmethod
    def from_environment(cls, timeout: float = 30.0) -> Kube:
        from kubernetes import config

        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG") or None)
        api.configuration.connection_pool_maxsize = POOL_SIZE
        api.rest_client.pool_manager.connection_pool_kw["maxsize"] = POOL_SIZE
        return cls(api, timeout)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def write(self, fn: Callable[..., Any], *args: Any) -> None:
        """A write whose answer the operator does not read: the body is drained, never decoded into the
        client's models (about 1.6 ms of a worker thread's time per pod, holding the GIL). A non-2xx answer
        still raises ``ApiException`` with its status and body."""

        def send() -> None:
            answer = fn(*args, _request_timeout=self.timeout, _preload_content=False)
            try:
                answer.drain_conn()
            finally:
                answer.release_conn()  # back to the pool for the next call

        await asyncio.to_thread(send)

    async def close(self) -> None:
        await asyncio.to_thread(self.api.close)

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
        await self.write(self.core.create_namespaced_pod, namespace, pod)

    async def delete_pod(self, namespace: str, name: str) -> None:
        try:
            await self.write(self.core.delete_namespaced_pod, name, namespace)
        except ApiException as err:
            if err.status != 404:  # 404: gone already
                raise

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.write(self.core.patch_namespaced_pod, name, namespace, patch)

    async def set_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> bool:
        """Write one condition of the pod's status; False when the pod is gone."""
        try:
            await self.write(
                self.core.patch_namespaced_pod_status, name, namespace, {"status": {"conditions": [condition]}}
            )
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
        await self.write(self.core.create_namespaced_secret, namespace, secret)

    async def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.write(self.core.patch_namespaced_secret, name, namespace, patch)

    # ------------------------------------------------------------ the set
    async def patch_set_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self.write(
            self.objects.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )


def api_message(err: ApiException) -> str:
    """The apiserver's own explanation (the Status body's message), else the HTTP reason."""
    try:
        return json.loads(err.body).get("message", err.reason)
    except (TypeError, ValueError):
        return str(err.reason)
