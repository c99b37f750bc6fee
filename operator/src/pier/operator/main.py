"""`pier operator`: runs the MCPSession operator of one namespace (kopf runs the process)."""

from __future__ import annotations

import kopf

from pier.core import tracing
from pier.operator import handlers  # noqa: F401 - registers the start-up, probe and clean-up handlers with kopf
from pier.operator.config import OperatorSettings


def run(settings: OperatorSettings, health_port: int = 8081, health_host: str = "0.0.0.0") -> int:
    """Serve until SIGTERM/SIGINT. Replicas elect one worker through a Lease (`settings.lease_name`).

    `health_port` 0 serves no liveness endpoint.
    """
    tracing.start("pier-operator")  # before kopf: a setting it cannot honour is one line, not a crash
    try:
        kopf.run(
            namespace=settings.namespace,
            standalone=True,  # no kopf peering: the Lease decides who works (leader.py)
            liveness_endpoint=f"http://{health_host}:{health_port}/healthz" if health_port else None,
            memo=kopf.Memo(listen_host=health_host, settings=settings),  # `/metrics` beside the liveness endpoint
        )
    finally:
        tracing.stop()
    return 0
