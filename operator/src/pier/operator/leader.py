"""Which operator replica works: a `coordination.k8s.io` Lease, as client-go's leader election uses one.

The holder renews the Lease every third of its duration; a standby takes it once it has seen the Lease
unchanged for a whole duration (its own clock, never a comparison with the holder's: clocks may differ).
Every change is a PUT conditional on the resource version read, so two replicas never both win. A holder
that cannot renew within two thirds of the duration stops working before anyone else may start. On shutdown the holder
gives the Lease up, so a standby (a rolling update's new replica) takes over at once.

Standby replicas keep their caches warm (their informers run): taking over costs no relisting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from pier.core.kube import ApiError, KubeClient

log = logging.getLogger("pier.operator.leader")

_STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # MicroTime


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime(_STAMP)


class LeaderElection:
    """Run `elect()` as a task; `leading` is set while this replica holds the Lease."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        duration_s: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration_s = duration_s
        self.leading = asyncio.Event()
        self.on_change = on_change or (lambda leading: None)
        self._seen: tuple[str, float] = ("", 0.0)  # (resourceVersion, when we first saw it)
        self._renewed = 0.0
        self._lease: dict[str, Any] | None = None  # as our last write returned it

    async def elect(self) -> None:
        """Acquire, renew, and stand by, until cancelled (then the Lease is given up if held)."""
        try:
            while True:
                try:
                    await self._round()
                except ApiError as exc:
                    log.warning("leader election: the API server refused", extra={"error": exc.message})
                # Stop working well before a standby may start (it waits a whole duration after the last renewal).
                if self.leading.is_set() and time.monotonic() - self._renewed > self.duration_s * 2 / 3:
                    self._lose("could not renew the Lease in time")
                await asyncio.sleep(self.duration_s / 3 if self.leading.is_set() else self.duration_s / 5)
        finally:
            if self.leading.is_set():
                await asyncio.shield(self._release())

    async def _round(self) -> None:
        if self.leading.is_set() and self._lease is not None:  # renew what we wrote: one request a round
            spec = self._lease.get("spec") or {}
            await self._write(
                "PUT", f"{self.path}/{self.name}", self._body(self._lease, spec.get("leaseTransitions") or 0)
            )
            return
        status, lease = await self.client.request("GET", f"{self.path}/{self.name}", verb="GET", timeout=5)
        if status == 404:
            await self._write("POST", self.path, self._body(None, 0))
            return
        if status != 200:
            raise ApiError(status, f"reading Lease {self.name}: HTTP {status}", lease)
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        if self._seen[0] != version:
            self._seen = (version, time.monotonic())
        holder = spec.get("holderIdentity") or ""
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            await self._write("PUT", f"{self.path}/{self.name}", self._body(lease, transitions))
            return
        if self.leading.is_set():
            self._lose(f"the Lease is held by {holder}")
        expired = time.monotonic() - self._seen[1] > float(spec.get("leaseDurationSeconds") or self.duration_s)
        if not holder or expired:
            await self._write("PUT", f"{self.path}/{self.name}", self._body(lease, transitions + 1))

    def _body(self, lease: dict[str, Any] | None, transitions: int) -> dict[str, Any]:
        now = _now()
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
        spec.update(
            holderIdentity=self.identity, leaseDurationSeconds=max(int(self.duration_s), 1), renewTime=now,
            leaseTransitions=transitions,
        )  # fmt: skip
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    async def _write(self, method: str, path: str, body: dict[str, Any]) -> None:
        status, answer = await self.client.request(method, path, body, verb=method, timeout=5, retry=False)
        self._lease = answer if status in (200, 201) else None
        if status in (200, 201):
            self._seen = (answer["metadata"]["resourceVersion"], time.monotonic())
            self._renewed = time.monotonic()
            if not self.leading.is_set():
                log.info("leading: this replica works now", extra={"identity": self.identity})
                self.leading.set()
                self.on_change(True)
        elif status != 409:  # 409: someone else wrote first; the next round reads who
            raise ApiError(status, f"writing Lease {self.name}: HTTP {status}", answer)

    def _lose(self, why: str) -> None:
        log.warning("no longer leading; standing by", extra={"identity": self.identity, "reason": why})
        self.leading.clear()
        self.on_change(False)

    async def _release(self) -> None:
        """Give the Lease up (a standby takes it at its next look instead of waiting out the duration)."""
        try:
            status, lease = await self.client.request("GET", f"{self.path}/{self.name}", timeout=3, retry=False)
            if status == 200 and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                await self.client.request("PUT", f"{self.path}/{self.name}", lease, timeout=3, retry=False)
        except ApiError as exc:
            log.warning("could not give the Lease up", extra={"error": exc.message})
        self.leading.clear()
