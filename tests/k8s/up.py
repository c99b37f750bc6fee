"""`make k8s-up` / `make k8s-down`: the test cluster (control plane + a real node) for people, with Pier installed
by the real Helm engine as a platform team installs it: release `pier` in namespace `pier`, the chart's default
values but the locally built images (no registry here, so `pullPolicy: Never`: they are imported on the node).

    python -m tests.k8s.up            # build what is missing, start the cluster in the background, install Pier,
                                      # print how to use it; the last line is `export KUBECONFIG=...`
    python -m tests.k8s.up --down     # stop the cluster and restore the host (also after a crash)

The cluster runs in a background process (its daemons die with it) whose state and logs are in .pier/k8s-up/.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.k8s.cluster import ControlPlane
from tests.k8s.realnode import (
    HostRecord,
    Image,
    RealCluster,
    chart_image_values,
    clean_host,
    service_url,
    wait_for_service,
)
from tools import helm

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".pier" / "k8s-up"
READY = STATE / "ready.json"
PID = STATE / "supervisor.pid"
LOG = STATE / "supervisor.log"
HOLDER = "make k8s-up (stop it with make k8s-down)"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def install_chart(
    kubeconfig: Path,
    images: dict[str, Image],
    *,
    release: str = "pier",
    namespace: str = "pier",
    values: dict[str, Any] | None = None,
    image: str = "pier",
    timeout: int = 600,
) -> dict[str, Any]:
    """`helm install` (Helm v4's engine, helm-python-sdk) of charts/pier with the local images; waits until every
    object is ready (kstatus). Returns Helm's release summary (its `info.notes` is what NOTES.txt rendered)."""
    import helm_python

    config = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        return config.install(
            helm.CHART,
            release,
            deep_merge(chart_image_values(images, image), values or {}),
            namespace=namespace,
            create_namespace=True,
            wait="watcher",
            timeout=timeout,
        )
    finally:
        config.close()


def uninstall_chart(kubeconfig: Path, release: str, namespace: str, timeout: int = 300) -> None:
    import helm_python

    config = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        config.uninstall(release, wait="watcher", timeout=timeout, ignore_not_found=True)
    finally:
        config.close()


@contextlib.contextmanager
def installed(
    cluster: RealCluster, release: str, namespace: str, values: dict[str, Any], image: str = "pier"
) -> Iterator[str]:
    """The chart installed on the test cluster for the length of a test (module): yields the router Service's URL
    once it serves; then the release's sessions, the release and its namespace go (the cluster stays)."""
    cp = cluster.cp
    install_chart(cp.kubeconfig, cluster.images, release=release, namespace=namespace, values=values, image=image)
    try:
        yield wait_for_service(cp, namespace, f"{release}-pier-router")
    finally:
        cp.kubectl("-n", namespace, "delete", "mcps", "--all", "--wait=true", "--timeout=120s", check=False)
        uninstall_chart(cp.kubeconfig, release, namespace)
        cp.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s", check=False, timeout=200)


def app_key(cp: ControlPlane, release: str = "pier", namespace: str = "pier") -> str:
    """The generated app key, read as NOTES.txt says: the `app-key` of Secret <release>-pier-keys."""
    fullname = "pier" if release == "pier" else f"{release}-pier"
    encoded = cp.kubectl("-n", namespace, "get", "secret", f"{fullname}-keys", "-o", "jsonpath={.data.app-key}")
    return base64.b64decode(encoded.stdout).decode()


# -- the background process that owns the cluster ---------------------------------------------------------------


def serve() -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # A new cluster each time: the last one's etcd would bring back its objects (and its images' names).
    shutil.rmtree(STATE / "cluster", ignore_errors=True)
    cluster = RealCluster(STATE / "cluster", lock_timeout=0, lock_holder=HOLDER)
    try:
        cluster.start()
        cp = cluster.cp
        ready = {
            "pid": os.getpid(),
            "kubeconfig": str(cp.kubeconfig),
            "work_dir": str(cp.work_dir),
            "bin_dir": str(cp.bin_dir),
            "images": {
                name: {**image.__dict__, "archive": str(image.archive)} for name, image in cluster.images.items()
            },
            "timings": {**cluster.timings, **{f"node_{k}": v for k, v in cluster.real_node.timings.items()}},
        }
        READY.write_text(json.dumps(ready, indent=1))
        print(f"cluster up: {json.dumps(ready['timings'])}", flush=True)
        stop.wait()
    finally:
        READY.unlink(missing_ok=True)
        cluster.stop()
        print("cluster stopped; host restored", flush=True)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _supervisor_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(PID.read_text())
        if _alive(pid):
            return pid
    return None


def up() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    if _supervisor_pid() is None:
        print("building what is missing (Kubernetes binaries, images; cached after the first time)", flush=True)
        t0 = time.monotonic()
        RealCluster(STATE / "cluster").build()
        print(f"built in {time.monotonic() - t0:.0f}s; starting the cluster (log: {LOG})", flush=True)
        READY.unlink(missing_ok=True)
        with LOG.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.k8s.up", "--serve"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this command; `make k8s-down` ends it
            )
        PID.write_text(str(proc.pid))
        while not READY.exists():
            if proc.poll() is not None:
                print(LOG.read_text(errors="replace")[-4000:], file=sys.stderr)
                print(f"the cluster did not start (exit {proc.returncode}); log: {LOG}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    ready = json.loads(READY.read_text())
    kubeconfig = Path(ready["kubeconfig"])
    cp = ControlPlane.running(Path(ready["work_dir"]), Path(ready["bin_dir"]))
    images = {name: Image(**{**entry, "archive": Path(entry["archive"])}) for name, entry in ready["images"].items()}

    if cp.kubectl("-n", "pier", "get", "secret", "pier-keys", check=False).returncode != 0:  # not installed yet
        print("helm install pier charts/pier --namespace pier --create-namespace (local images)", flush=True)
        install_chart(kubeconfig, images)
    notes = helm.render_notes(chart_image_values(images))  # what `helm install` prints
    cp.kubectl("-n", "pier", "wait", "--for=condition=Ready", "pods", "--all", "--timeout=300s", timeout=320)
    kubectl = cp.bin_dir / "kubectl"
    print(cp.kubectl("get", "nodes", "-o", "wide").stdout)
    print(cp.kubectl("-n", "pier", "get", "pods", "-o", "wide").stdout)
    print(notes.strip() + "\n")
    router = service_url(cp, "pier", "pier-router")
    # The key stays in its Secret (read as NOTES.txt says above): never printed.
    print("This machine reaches ClusterIPs directly (kube-proxy), so besides the port-forward above:")
    print(f"  curl -s -X POST {router}/v1/users/alice/servers/demo/tools/echo/call \\")
    print("    -H \"Authorization: Bearer $PIER_KEY\" -H 'Content-Type: application/json' \\")
    print('    -d \'{"arguments": {"message": "hi"}}\'')
    print(f"kubectl is {kubectl}; `make k8s-down` stops the cluster and restores the host.")
    print(f"export PATH={kubectl.parent}:$PATH")
    print(f"export KUBECONFIG={kubeconfig}")
    return 0


def down() -> int:
    pid = _supervisor_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 180
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    PID.unlink(missing_ok=True)
    READY.unlink(missing_ok=True)
    # A supervisor that crashed (or was killed) left its record: undo what it did.
    if HostRecord.load() is not None:
        problems = clean_host()
        if problems:
            print("the host could not be fully restored: " + "; ".join(problems), file=sys.stderr)
            return 1
    print("the test cluster is stopped and the host restored")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--down", action="store_true", help="stop the cluster, restore the host")
    group.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve()
    return down() if args.down else up()


if __name__ == "__main__":
    raise SystemExit(main())
