"""Smoke test of the test control plane: build if needed, start, exercise what Pier's tests rely on, stop.

    .venv/bin/python tests/k8s/smoke.py

Exits non-zero on the first failure; the work dir (process logs under logs/) is then kept and printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when run as a script

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s.cluster import BINARIES, BUILD_SCRIPT, ControlPlane, default_bin_dir

NS = "smoke"


def step(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90.0) -> float:
    """Poll `check` until true; return the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - t0


def build() -> tuple[Path, str]:
    """Run the build script (a no-op when the binaries are cached); return the bin dir and a timing summary."""
    cached = all(os.access(default_bin_dir() / name, os.X_OK) for name in BINARIES)
    t0 = time.monotonic()
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    took = time.monotonic() - t0
    summary = f"skipped (cached; script returned in {took:.2f}s)" if cached else f"built in {took:.0f}s"
    return Path(out.strip().splitlines()[-1]), summary


def main() -> int:
    step("build (if needed)")
    bin_dir, build_summary = build()
    step(f"build: {build_summary}; bin dir {bin_dir}")

    work = Path(tempfile.mkdtemp(prefix="pier-k8s-smoke-"))
    cp = ControlPlane(work, bin_dir)
    t0 = time.monotonic()
    try:
        cp.start()
        step(f"control plane up at {cp.server} in {time.monotonic() - t0:.1f}s; timings {cp.timings}")
        run_checks(cp)
    except BaseException:
        step(f"FAILED; logs kept in {work / 'logs'}")
        cp.stop()
        raise
    pids = cp.pids
    t_stop = time.monotonic()
    cp.stop()
    stop_took = time.monotonic() - t_stop
    for name, pgid in pids.items():  # nothing of any process group may survive stop()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"{name} (process group {pgid}) survived stop()")
    shutil.rmtree(work)

    print("\nsmoke OK")
    print(f"  build:             {build_summary}")
    print(f"  etcd healthy:      {cp.timings['etcd']:.2f}s")
    print(f"  apiserver ready:   {cp.timings['apiserver_ready']:.2f}s  (from start(), incl. certs and etcd)")
    print(f"  default SA token:  {cp.timings['default_token']:.2f}s  (start() returns here)")
    print(f"  stop():            {stop_took:.2f}s")
    return 0


def run_checks(cp: ControlPlane) -> None:
    api = client.CoreV1Api(cp.api_client())
    rbac = client.RbacAuthorizationV1Api(cp.api_client())

    step("namespace + ConfigMap with the Python client")
    api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    owner = api.create_namespaced_config_map(
        NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"k": "v"})
    )

    step("kubectl get ns")
    out = cp.kubectl("get", "ns").stdout
    print(out.rstrip())
    assert NS in out.split(), out

    step("Pod owned by the ConfigMap (stays Pending: no nodes)")
    # The ServiceAccount admission plugin rejects Pods until the namespace's `default` SA has its token.
    took = wait_for("default SA token in the new namespace", lambda: bool(cp.service_account_token(NS)))
    print(f"  default SA token in {NS!r} after {took:.2f}s")
    assert owner.metadata is not None
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="owned", owner_references=[ref]),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )
    api.create_namespaced_pod(NS, pod)
    # A control: the same Pod without an owner must survive, so the deletion below is the garbage collector's.
    pod.metadata = client.V1ObjectMeta(name="unowned")
    api.create_namespaced_pod(NS, pod)
    owned = api.read_namespaced_pod("owned", NS)
    assert owned.status is not None
    assert owned.status.phase == "Pending"

    step("delete the ConfigMap: the garbage collector must delete the Pod")
    api.delete_namespaced_config_map("owner", NS)

    def pod_gone() -> bool:
        try:
            api.read_namespaced_pod("owned", NS)
        except ApiException as err:
            if err.status == 404:
                return True
            raise
        return False

    print(f"  Pod deleted {wait_for('garbage collection of the Pod', pod_gone):.2f}s after its owner")
    unowned = api.read_namespaced_pod("unowned", NS)
    assert unowned.metadata is not None
    assert unowned.metadata.deletion_timestamp is None

    check_service_account(cp, api, rbac)


def check_service_account(cp: ControlPlane, api: client.CoreV1Api, rbac: client.RbacAuthorizationV1Api) -> None:
    step("ServiceAccount token kubeconfig: exactly the SA's RBAC")
    api.create_namespaced_service_account(NS, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader")))
    rbac.create_namespaced_role(
        NS,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list", "watch"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        NS,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=NS)],
        ),
    )
    kubeconfig = cp.token_kubeconfig(NS, "reader")
    assert cp.kubectl("auth", "can-i", "list", "configmaps", kubeconfig=kubeconfig).stdout.strip() == "yes"
    denied = cp.kubectl("auth", "can-i", "list", "pods", kubeconfig=kubeconfig, check=False)
    assert (denied.returncode, denied.stdout.strip()) == (1, "no"), denied
    print(cp.kubectl("auth", "can-i", "--list", kubeconfig=kubeconfig).stdout.rstrip())

    # whoami for 1.20 (no SelfSubjectReview yet): the API names the caller when it refuses something.
    sa_api = client.CoreV1Api(cp.api_client(kubeconfig))
    # Allowed; the one ConfigMap left is the CA bundle 1.20's root-ca-cert-publisher puts in every namespace.
    names = [cm.metadata.name if cm.metadata else None for cm in sa_api.list_namespaced_config_map(NS).items]
    assert names == ["kube-root-ca.crt"], names
    refused: ApiException | None = None
    try:
        sa_api.list_namespaced_pod(NS)
    except ApiException as err:
        refused = err
    assert refused is not None, "the ServiceAccount could list Pods"
    assert refused.status == 403, refused
    message = json.loads(refused.body or "{}")["message"]
    assert 'User "system:serviceaccount:smoke:reader"' in message, message
    print("  token authenticates as system:serviceaccount:smoke:reader; configmaps yes, pods no")


if __name__ == "__main__":
    sys.exit(main())
