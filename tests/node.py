"""A real node on this machine: containerd (Debian's) and a kubelet built from its Go module.

The kubelet comes from the cache of ``scripts/build-k8s.sh`` (issue "A real Kubernetes control
plane"); it runs standalone (static pods from a folder) or, given a ``ControlPlane``, registered
with its API server as ``system:node:node-0`` (group ``system:nodes``: the Node authorizer),
with the node address 127.0.0.1 and kube-scheduler from the same cache beside it; with
``failCgroupV1: false`` and ``cgroupDriver: cgroupfs`` for this machine's cgroup v1 layout, on
127.0.0.1 and free ports. containerd runs with a private root, state and socket (overlayfs
snapshotter, runc, ``restrict_oom_score_adj``: root here cannot lower its OOM score; a CNI
configuration naming only the loopback plugin, with no plugin binary at all, so that containerd
reports its network ready: only host-network pods run here, and those never call CNI). The pod
sandbox image is Kubernetes' own pause program, compiled from the kubelet's module source and
packed here into an OCI archive. Every process is stopped and every mount undone on `stop()`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from controlplane import ControlPlane
from imagerun import missing
from peers import free_port

CACHE = Path(os.environ.get("MAILFLOW_CACHE", Path.home() / ".cache" / "mailflow"))
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
NODE_NAME = "node-0"
# No pod network: host-network pods never call CNI. The configuration only tells containerd
# (hence the kubelet's Ready condition) that one is configured; no plugin binary is installed.
CNI_CONFIG = {
    "cniVersion": "1.0.0",
    "name": "mailflow-host-only",
    "plugins": [{"type": "loopback"}],
}


def kubelet_binary() -> Path:
    found = sorted(CACHE.glob("k8s/v*/bin/kubelet"))
    if not found:
        missing(f"no kubelet in {CACHE}/k8s/*/bin: run scripts/build-k8s.sh (make k8s)")
    return found[-1]


def pause_source(kubelet: Path) -> Path:
    version = kubelet.parent.parent.name  # .../k8s/v1.35.4/bin/kubelet
    modules = Path(os.environ.get("GOMODCACHE", Path.home() / "go" / "pkg" / "mod"))
    source = modules / f"k8s.io/kubernetes@{version}/build/pause/linux/pause.c"
    if not source.exists():
        missing(f"{source} is missing: scripts/build-k8s.sh downloads it with the kubelet")
    return source


def _blob(layout: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layout["blobs/sha256/" + digest.split(":")[1]] = data
    return {"digest": digest, "size": len(data)}


def pause_archive(binary: Path, path: Path) -> None:
    """An OCI archive of one layer holding /pause, named PAUSE_IMAGE."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(binary), "pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        with binary.open("rb") as stream:
            tar.addfile(info, stream)
    raw = layer.getvalue()
    compressed = gzip.compress(raw, mtime=0)
    layout: dict[str, bytes] = {}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(layout, json.dumps(config).encode()),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                **_blob(layout, compressed),
            }
        ],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(layout, json.dumps(manifest).encode()),
                "annotations": {
                    "org.opencontainers.image.ref.name": PAUSE_IMAGE,
                    "io.containerd.image.name": PAUSE_IMAGE,
                },
            }
        ],
    }
    layout["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    layout["index.json"] = json.dumps(index).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in sorted(layout.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


CONTAINERD_CONFIG = """\
version = 2
root = "{root}/root"
state = "{root}/state"
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{root}/cni/bin"
    conf_dir = "{root}/cni/net.d"
"""


class Node:
    """containerd + a standalone kubelet; `static(name, pod)` runs a pod, `remove(name)`
    deletes it as a node drain would (preStop, SIGTERM, grace period)."""

    def __init__(self, api: ControlPlane | None = None) -> None:
        self.api = api
        self.kubelet = kubelet_binary()
        for tool in ("containerd", "ctr", "gcc"):
            if shutil.which(tool) is None:
                missing(f"{tool} is not installed: `make test-images` installs it (as root)")
        self.pause_c = pause_source(self.kubelet)
        # Short: unix socket paths must stay under 108 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="mf-node-", dir="/tmp"))
        self.socket = self.folder / "containerd" / "containerd.sock"
        self.manifests = self.folder / "manifests"
        self.healthz = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # --- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.folder / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                ["nice", "-n", "10", *argv],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log(self, name: str, lines: int = 30) -> str:
        path = self.folder / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ctr(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr}"
        return result.stdout

    def start(self) -> None:
        root = self.folder / "containerd"
        for sub in ("cni/bin", "cni/net.d"):
            (root / sub).mkdir(parents=True)
        (root / "cni/net.d/10-host-only.conflist").write_text(json.dumps(CNI_CONFIG))
        (root / "config.toml").write_text(CONTAINERD_CONFIG.format(root=root, pause=PAUSE_IMAGE))
        self._spawn("containerd", ["containerd", "--config", str(root / "config.toml")])
        self._wait(lambda: self.socket.exists(), "containerd", 30)
        pause = self.folder / "pause"
        subprocess.run(
            ["gcc", "-Os", "-static", "-DVERSION=3.10", "-o", str(pause), str(self.pause_c)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pause_archive(pause, self.folder / "pause.oci.tar")
        self.import_archive(self.folder / "pause.oci.tar")
        self.manifests.mkdir()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine mounts cgroup v1 (hybrid), driven by cgroupfs, without QoS cgroups.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "staticPodPath": str(self.manifests),
            "podLogsDir": str(self.folder / "pod-logs"),
            "address": "127.0.0.1",
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "failSwapOn": False,
            "localStorageCapacityIsolation": False,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "fileCheckFrequency": "1s",
            "syncFrequency": "5s",
            "evictionHard": {},
            "imageGCHighThresholdPercent": 100,
            "resolvConf": "",
        }
        (self.folder / "kubelet.yaml").write_text(yaml.safe_dump(config))
        argv = [
            str(self.kubelet),
            "--config",
            str(self.folder / "kubelet.yaml"),
            "--root-dir",
            str(self.folder / "kubelet"),
            "--cert-dir",
            str(self.folder / "kubelet-pki"),
            "--hostname-override",
            NODE_NAME,
        ]
        if self.api is not None:
            kubeconfig = self.api.client_kubeconfig(
                "kubelet", f"system:node:{NODE_NAME}", ["system:nodes"]
            )
            # 127.0.0.1 keeps the machine's other addresses out of the API: the kubelet then
            # reports no address at all ("nodeIP can't be loopback address" in its log), and
            # the host-network pods have no pod IP; nothing here routes by either.
            argv += ["--kubeconfig", str(kubeconfig), "--node-ip", "127.0.0.1"]
        self._spawn("kubelet", argv)
        self._wait(self._healthy, "kubelet", 60)
        if self.api is not None:
            self._start_scheduler(self.api)

    def _start_scheduler(self, api: ControlPlane) -> None:
        kubeconfig = api.client_kubeconfig("scheduler", "system:kube-scheduler")
        port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(self.kubelet.parent / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

        def healthy() -> bool:
            with contextlib.suppress(OSError):
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # its self-signed serving certificate
                url = f"https://127.0.0.1:{port}/healthz"
                with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                    return bool(answer.status == 200)
            return False

        self._wait(healthy, "kube-scheduler", 60)

    def pod_logs(self, lines: int = 40) -> str:
        """The last lines of every container log the kubelet wrote (failures print them)."""
        parts = []
        for path in sorted((self.folder / "pod-logs").glob("*/*/*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.relative_to(self.folder)}\n" + "\n".join(text))
        return "\n".join(parts)

    def _healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.healthz}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
        return False

    def _wait(self, ready: Any, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)}"
            time.sleep(0.2)
        raise AssertionError(f"{name} did not start within {timeout}s:\n{self.log(name)}")

    # --- images and pods ------------------------------------------------------------------

    def import_archive(self, archive: Path) -> None:
        self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))

    def images(self) -> dict[str, str]:
        """image name -> manifest digest, as containerd lists them."""
        listed: dict[str, str] = {}
        for line in self.ctr("images", "ls").splitlines()[1:]:
            name, _kind, digest, *_ = line.split()
            listed[name] = digest
        return listed

    def running_tasks(self) -> int:
        lines = self.ctr("tasks", "ls").splitlines()[1:]
        return sum(1 for line in lines if "RUNNING" in line)

    def static(self, name: str, pod: dict[str, Any]) -> None:
        (self.manifests / f"{name}.yaml").write_text(yaml.safe_dump(pod))

    def remove(self, name: str, timeout: float) -> float:
        """Deletes the static pod; returns the seconds until no container runs any more."""
        started = time.monotonic()
        (self.manifests / f"{name}.yaml").unlink()
        while self.running_tasks() and time.monotonic() - started < timeout:
            time.sleep(0.5)
        assert not self.running_tasks(), self.log("kubelet")
        return time.monotonic() - started

    # --- teardown -------------------------------------------------------------------------

    def _kill_tasks(self) -> None:
        """What the kubelet left running (a failed test): killed and deleted, so that no
        containerd shim outlives the test."""
        process = self.processes.get("containerd")
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            for line in self.ctr("tasks", "ls", timeout=30).splitlines()[1:]:
                task = line.split()[0]
                with contextlib.suppress(AssertionError):
                    self.ctr("tasks", "kill", "--signal", "SIGKILL", task, timeout=30)
                time.sleep(0.5)
                with contextlib.suppress(AssertionError):
                    self.ctr("tasks", "delete", "--force", task, timeout=30)

    def stop(self) -> None:
        scheduler = self.processes.pop("kube-scheduler", None)
        if scheduler is not None and scheduler.poll() is None:
            os.killpg(scheduler.pid, signal.SIGTERM)
            scheduler.wait(15)
        kubelet = self.processes.pop("kubelet", None)
        if kubelet is not None and kubelet.poll() is None:
            os.killpg(kubelet.pid, signal.SIGTERM)
            kubelet.wait(15)
        self._kill_tasks()
        for name in ("containerd",):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(15)
        # The kubelet bind-mounts its root folder; containerd mounts a sandbox's /dev/shm.
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.folder))
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], check=False, capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        # The one path the kubelet does not take from its configuration.
        with contextlib.suppress(OSError):
            Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink()

    def __enter__(self) -> Node:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
