"""Ending a stock SGLang client's wait at once when this agent refuses its R-Fork request.

A stock SGLang NCCL client (0.5.23) POSTs ``/init_weights_send_group_for_remote_instance`` without an
Authorization header and never reads the answer: it joins the group's rendezvous at
``tcp://<seed>:<port>`` as rank 1 and waits there for the seed, for the process-group timeout (30 min).
An answer cannot reach it, and a closed or resetting port does not either: torch's store client retries
both until its timeout. What ends the wait is a store that accepts the client and then goes away: its next
read fails at once ("Connection was likely closed"), SGLang's load fails and its process exits with that
error. So a refused request that names this agent as the master gets a short-lived store on each of its
ports (docs/sglang.md, "Stock SGLang").
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

log = logging.getLogger("seedfork.agent.refusal")

MAX_PORTS = 8  # SGLang asks for one port per TP rank
WAIT_S = 10.0  # how long a refused port waits for the client to arrive

_busy: set[int] = set()
_lock = threading.Lock()


def end_rendezvous(host: str, port: int, wait_s: float = WAIT_S) -> bool:
    """Host the group's store at ``host:port`` until a client has joined (at most ``wait_s``), then close it.

    True when a client joined and was let go. Never raises: a port already in use (a real group) is left alone.
    """
    from .groups import master_store

    with _lock:
        if port in _busy:
            return False
        _busy.add(port)
    try:
        store = master_store(host, port, 2, timedelta(seconds=wait_s))  # on the pod IP only, as every store
    except Exception as e:
        log.info("not refusing the rendezvous on %s:%d: %s", host, port, e)
        with _lock:
            _busy.discard(port)
        return False
    try:
        deadline = time.monotonic() + wait_s
        while store.num_keys() <= 1 and time.monotonic() < deadline:  # the master's own key is one
            time.sleep(0.05)
        joined = store.num_keys() > 1
        if joined:
            time.sleep(0.2)  # let the client reach its wait, so that it reads the close
        return joined
    finally:
        del store
        with _lock:
            _busy.discard(port)


def refuse_stock_client(host: str, body: object) -> list[int]:
    """The ports whose rendezvous will be ended for this refused init request (each in its own thread).

    Only a request in SGLang's shape that names this agent (``host``) as the master, with at most
    ``MAX_PORTS`` ports, gets one.
    """
    if not isinstance(body, dict) or str(body.get("master_address", "")) != host:
        return []
    try:
        ports = [int(p) for p in str(body["ports"]).split(",")]
    except (KeyError, ValueError):
        return []
    if not 0 < len(ports) <= MAX_PORTS or any(not 1024 <= p <= 65535 for p in ports):
        return []
    for port in ports:
        threading.Thread(target=end_rendezvous, args=(host, port), daemon=True, name=f"refuse-{port}").start()
    return ports
