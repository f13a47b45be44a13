"""kopf wiring, kept thin: an index of owned pods, one daemon per set that runs the reconciler
level-triggered (every ``interval`` seconds, and at once when the set or one of its pods changes).

kopf's own bookkeeping stays out of the status: progress and diff-base live in
``operator.seedfork.io/*`` annotations, handlers return None.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from seedfork_api.contract import LABEL_MANAGED_BY, LABEL_SET, MANAGED_BY
from seedfork_api.spec import GROUP, KIND, PLURAL, VERSION

from . import metrics
from .config import OperatorConfig
from .kubeapi import POOL_SIZE, Kube
from .podview import PodView
from .reconciler import SetReconciler

KOPF_PREFIX = "operator.seedfork.io"
OWNED = {LABEL_MANAGED_BY: MANAGED_BY}


def _owner_uid(meta: Any) -> str | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return ref.get("uid")
    return None


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else $KUBECONFIG (read now, not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING  # Events are posted explicitly, not from every log line
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90  # a watch the apiserver stopped answering is reopened
    if getattr(memo, "config", None) is None:
        memo.config = OperatorConfig.from_env()
    settings.networking.request_timeout = memo.config.api_timeout
    memo.wakeups = {}  # (namespace, set uid) -> its daemon's Wakeup
    memo.set_uids = {}  # (namespace, set name) -> uid, for Secrets labelled with a set's name
    # Blocking API calls run in threads; the default pool (cpus + 4) would serialise a 100-pod scale-out.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="seedfork-api"))
    memo.kube = await asyncio.to_thread(Kube.from_environment, memo.config.api_timeout)
    metrics.serve(memo.config.metrics_port, memo.config.metrics_addr)
    logger.info("seedfork operator configured: %s", memo.config)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        await kube.close()


@kopf.index("pods", labels=OWNED)
def pods_by_owner(meta: Any, body: Any, namespace: str, **_: Any) -> dict[tuple[str, str], PodView] | None:
    owner = _owner_uid(meta)
    return {(namespace, owner): PodView.from_pod(body)} if owner else None


class Wakeup:
    """What wakes a set's daemon: any event of the set or its pods; an urgent one also skips the debounce."""

    def __init__(self) -> None:
        self.any = asyncio.Event()
        self.urgent = asyncio.Event()

    def set(self, urgent: bool) -> None:
        if urgent:
            self.urgent.set()
        self.any.set()

    def clear(self) -> None:
        self.any.clear()
        self.urgent.clear()

    async def wait(self, interval: float, debounce: float) -> None:
        """Right after a pass: until an event (at most ``interval`` s). Events right after the pass are a burst
        under way, the pods that pass created or patched: they settle into one pass, ``debounce`` s later. One
        after a quiet spell (a scale request) is acted on at once, and so is an urgent one (a pod waiting for
        its gate): a promotion's two control-loop hops would each wait the debounce otherwise."""
        loop = asyncio.get_running_loop()
        pass_ended = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.any.wait(), timeout=interval)
        if not self.urgent.is_set() and loop.time() - pass_ended < debounce:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.urgent.wait(), timeout=debounce)


def _wake(memo: kopf.Memo, key: tuple[str, str | None], urgent: bool = False) -> None:
    """Wake the set's daemon; ``urgent``: its next pass starts without the debounce."""
    wakeup = memo.wakeups.get(key) if hasattr(memo, "wakeups") else None
    if wakeup is not None:
        wakeup.set(urgent)


@kopf.on.event("pods", labels=OWNED)
async def pod_changed(body: kopf.Body, meta: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    view = PodView.from_pod(body)
    # A pod whose weights are verified waits only for its gate: the one write no burst may hold back.
    _wake(memo, (namespace, _owner_uid(meta)), urgent=view.verified and not view.gate)


@kopf.on.event("", "v1", "secrets", labels={LABEL_SET: kopf.PRESENT})
async def token_secret_changed(meta: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A set's token Secret was changed or deleted: its set reads it at once (no cached check).

    The operator's own Secret is owned by its set; a Secret named by spec.transfer.tokenSecretName is seen
    at once when it carries the label seedfork.io/set=<set name>, else on the set's next pass.
    """
    owner = _owner_uid(meta)
    if owner is None and hasattr(memo, "set_uids"):
        owner = memo.set_uids.get((namespace, (meta.get("labels") or {}).get(LABEL_SET)))
    _wake(memo, (namespace, owner))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def set_changed(uid: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _wake(memo, (namespace, uid))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=2.0)
async def run_set(
    body: kopf.Body,
    name: str,
    namespace: str,
    uid: str,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    pods_by_owner: kopf.Index,
    logger: logging.Logger,
    **_: Any,
) -> None:
    key = (namespace, uid)
    config: OperatorConfig = memo.config
    wakeup = memo.wakeups.setdefault(key, Wakeup())
    memo.set_uids[(namespace, name)] = uid
    reconciler = SetReconciler(kube=memo.kube, config=config, namespace=namespace, name=name, uid=uid)
    try:
        while not stopped:
            wakeup.clear()
            try:
                await reconciler.reconcile(body, list(pods_by_owner.get(key, [])))
            except Exception:  # one bad pass must not stop the set's reconciliation
                logger.exception("reconcile of %s/%s failed; retrying", namespace, name)
            await wakeup.wait(config.interval, config.debounce)
    finally:
        memo.wakeups.pop(key, None)
        memo.set_uids.pop((namespace, name), None)
