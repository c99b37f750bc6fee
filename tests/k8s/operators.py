"""`pier operator` as a process of the k8s tests, and the deploy/ objects it needs (its RBAC exactly)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from tests.servers import ROOT

_ACCESS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def deploy_access() -> list[dict[str, Any]]:
    """deploy/'s namespace, ServiceAccounts and RBAC (not its workloads: the tests run operator and router)."""
    return [o for o in yaml.safe_load_all((ROOT / "deploy" / "pier.yaml").read_text()) if o["kind"] in _ACCESS]


@contextlib.asynccontextmanager
async def operator_process(env: dict[str, str], log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`pier operator` with `env` on top of the tests' environment (no liveness endpoint), stopped at the end
    (SIGTERM: it gives its Lease up, so the next one leads at once)."""
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pier.cli", "operator", "--health-port", "0", env={**os.environ, **env},
            stdout=log, stderr=log,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
