"""Operator settings: command-line flags override environment variables, which override defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_AGENT_IMAGE = "ghcr.io/seedfork/seedfork-agent:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    agent_image: str = DEFAULT_AGENT_IMAGE  # image of the injected agent sidecar
    interval: float = 10.0  # seconds between level-triggered passes per set (events wake it sooner)
    debounce: float = 0.05  # let a burst of pod events settle into one pass
    metrics_port: int = 8080  # 0 disables the endpoint
    metrics_addr: str = "0.0.0.0"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        return cls(
            agent_image=env.get("SEEDFORK_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
            interval=float(env.get("SEEDFORK_RECONCILE_INTERVAL", "10")),
            metrics_port=int(env.get("SEEDFORK_METRICS_PORT", "8080")),
            metrics_addr=env.get("SEEDFORK_METRICS_ADDR", "0.0.0.0"),
        )
