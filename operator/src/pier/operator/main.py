"""`pier operator`: runs the kopf handlers for the MCPSessions of one namespace."""

from __future__ import annotations

import kopf

from pier.core import tracing
from pier.operator import handlers  # noqa: F401 - registers the handlers with kopf
from pier.operator.config import OperatorSettings


def run(settings: OperatorSettings, health_port: int = 8081, health_host: str = "0.0.0.0") -> int:
    """Serve until SIGTERM/SIGINT. Replicas coordinate through kopf peering (`KopfPeering` "pier").

    `health_port` 0 serves no liveness endpoint.
    """
    tracing.start("pier-operator")  # before kopf: a setting it cannot honour is one line, not a crash
    try:
        kopf.run(
            namespace=settings.namespace,
            peering_name="pier",
            standalone=False,
            liveness_endpoint=f"http://{health_host}:{health_port}/healthz" if health_port else None,
            memo=kopf.Memo(listen_host=health_host),  # `/metrics` listens beside the liveness endpoint
        )
    finally:
        tracing.stop()
    return 0
