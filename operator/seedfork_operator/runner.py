"""Run the operator inside this process, in a thread: for tests and embedding.

    with OperatorThread(namespaces=["ns"], config=OperatorConfig(interval=1, metrics_port=0)):
        ...  # the operator reconciles until the block ends

Leaving the block stops it as a pod termination would (daemons cancelled, watches closed);
entering a new one is an operator restart: nothing carries over but what is in the API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import kopf

from .config import OperatorConfig


class OperatorThread:
    def __init__(self, namespaces: Sequence[str], config: OperatorConfig | None = None, start_timeout: float = 30):
        self.namespaces = list(namespaces)
        self.config = config or OperatorConfig(metrics_port=0)
        self.start_timeout = start_timeout
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        from . import handlers  # noqa: F401  (registers the kopf handlers)

        try:
            asyncio.run(
                kopf.operator(
                    standalone=True,
                    namespaces=self.namespaces,
                    memo=kopf.Memo(config=self.config),
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                )
            )
        except BaseException as err:  # surfaced to the test on exit
            self.error = err

    def __enter__(self) -> OperatorThread:
        self._thread = threading.Thread(target=self._main, name="seedfork-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self.__exit__()
            raise TimeoutError(f"operator not ready within {self.start_timeout}s: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                raise RuntimeError("operator thread did not stop within 30s")
        if self.error is not None:
            raise RuntimeError(f"operator failed: {self.error!r}") from self.error
