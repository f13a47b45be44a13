"""Operator settings: command-line flags override environment variables, which override defaults."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pydantic import ValidationError

from seedfork_api.spec import TransferSpec

DEFAULT_AGENT_IMAGE = "ghcr.io/seedfork/seedfork-agent:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    agent_image: str = DEFAULT_AGENT_IMAGE  # image of the injected agent sidecar
    interval: float = 10.0  # seconds between level-triggered passes per set (events wake it sooner)
    debounce: float = 0.05  # an event this soon after a pass: a burst is under way, let it settle into one pass
    metrics_port: int = 8080  # 0 disables the endpoint
    metrics_addr: str = "0.0.0.0"
    transfer_defaults: TransferSpec | None = None  # the cluster's transfer policy for fields a set leaves unset
    api_timeout: float = 30.0  # seconds any one API request may take (a frozen apiserver must not stall a pass)
    storage_backoff: float = 5.0  # first wait after a failed storage load, doubled per failure in a row
    storage_backoff_cap: float = 300.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        return cls(
            agent_image=env.get("SEEDFORK_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
            interval=float(env.get("SEEDFORK_RECONCILE_INTERVAL", "10")),
            metrics_port=int(env.get("SEEDFORK_METRICS_PORT", "8080")),
            metrics_addr=env.get("SEEDFORK_METRICS_ADDR", "0.0.0.0"),
            transfer_defaults=parse_transfer_defaults(env.get("SEEDFORK_TRANSFER_DEFAULTS", "")),
        )


class ConfigError(ValueError):
    pass


def parse_transfer_defaults(raw: str) -> TransferSpec | None:
    """``{"backend": "nccl", "retries": 3}`` (the CRD's field names) -> a checked policy; empty -> None."""
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"transfer defaults are not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("transfer defaults must be a JSON object")
    allowed = {TransferSpec.model_fields[f].alias for f in TransferSpec.CLUSTER_DEFAULTED}
    other = sorted(set(data) - allowed)
    if other:
        raise ConfigError(f"transfer defaults may set only {', '.join(sorted(allowed))}; not {', '.join(other)}")
    try:
        return TransferSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"transfer defaults: {where}: {first['msg']}") from None
