"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

Built from their Go modules by ``scripts/build-k8s.sh`` (pins in ``tools/k8s`` and
``tools/etcd``) and started much as controller-runtime's envtest starts them: every server
binds 127.0.0.1 on a free port, the certificates are made here (a serving certificate with IP
SAN 127.0.0.1, one client CA, an admin client certificate in ``system:masters``, the
service-account signing key), authorization is ``Node,RBAC``. Services are API objects only:
nothing here or in the tests ever dials an address of ``SERVICE_CIDR``.

``ControlPlane.start()`` waits for ``/readyz`` and for the controller manager's first work
(the ``default`` ServiceAccount and the ``kube-root-ca.crt`` ConfigMap), writes a kubeconfig
and returns; ``stop()`` ends every process. The logs stay in ``folder / "logs"``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-k8s.sh"
LOOPBACK = "127.0.0.1"
# The Service network exists only as API data (ClusterIPs on Service objects); no test and
# no process started here ever sends a packet to it.
SERVICE_CIDR = "10.96.0.0/24"


class ControlPlaneUnavailable(Exception):
    """The binaries are missing and cannot be built here (reason in the message)."""


@dataclass(frozen=True)
class Binaries:
    k8s_bin: Path
    etcd_bin: Path
    k8s_version: str
    etcd_version: str

    def path(self, name: str) -> Path:
        return (self.etcd_bin if name == "etcd" else self.k8s_bin) / name


def build_binaries(timeout: float = 7200) -> Binaries:
    """Builds (or reuses) the binaries with the project's script; raises when it cannot."""
    if shutil.which(os.environ.get("GO", "go")) is None:
        raise ControlPlaneUnavailable("no Go toolchain on PATH: cannot build kube-apiserver/etcd")
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-30:])
        raise ControlPlaneUnavailable(f"scripts/build-k8s.sh failed ({result.returncode}):\n{tail}")
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return Binaries(
        k8s_bin=Path(env["MAILFLOW_K8S_BIN"]),
        etcd_bin=Path(env["MAILFLOW_ETCD_BIN"]),
        k8s_version=env["MAILFLOW_K8S_VERSION"],
        etcd_version=env["MAILFLOW_ETCD_VERSION"],
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- certificates ---------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class KeyPair:
    cert_file: Path
    key_file: Path


class CertificateAuthority:
    """One CA with EC P-256 keys; issues serving and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        slug = name.lower().replace(" ", "-")
        self.cert_file = folder / f"{slug}.crt"
        self.cert_file.write_bytes(_pem_cert(self.certificate))

    @property
    def pem(self) -> bytes:
        return _pem_cert(self.certificate)

    def issue(
        self,
        slug: str,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server: bool = False,
        ips: Sequence[str] = (),
        dns_names: Sequence[str] = (),
    ) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [
            x509.DNSName(n) for n in dns_names
        ]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        pair = KeyPair(self.folder / f"{slug}.crt", self.folder / f"{slug}.key")
        pair.cert_file.write_bytes(_pem_cert(certificate))
        pair.key_file.write_bytes(_pem_key(key))
        pair.key_file.chmod(0o600)
        return pair


# --- processes ------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    argv: list[str]
    log_file: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=timeout)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in ``folder``, all on 127.0.0.1."""

    binaries: Binaries
    folder: Path
    processes: list[Process] = field(default_factory=list)
    api_port: int = 0
    etcd_port: int = 0
    # The node suite adds the workload controllers (tests/images/test_cluster_node.py).
    controllers: tuple[str, ...] = field(default_factory=lambda: CONTROLLERS)
    authority: CertificateAuthority | None = None

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.api_port}"

    @property
    def pki(self) -> Path:
        return self.folder / "pki"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        """Every request the API server served, at level Metadata (user, verb, resource)."""
        return self.logs / "audit.jsonl"

    def audit_events(self, user: str) -> list[dict[str, Any]]:
        events = []
        with self.audit_log.open() as lines:
            for line in lines:
                event = json.loads(line)
                if event.get("user", {}).get("username") == user:
                    events.append(event)
        return events

    @property
    def ca_file(self) -> Path:
        return self.pki / "kubernetes-ca.crt"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._make_pki()
        self.etcd_port = free_port()
        etcd_peer = free_port()
        self.api_port = free_port()
        etcd_url = f"http://{LOOPBACK}:{self.etcd_port}"
        peer_url = f"http://{LOOPBACK}:{etcd_peer}"
        etcd = self._process(
            "etcd",
            [
                str(self.binaries.path("etcd")),
                "--name=default",
                f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                # A throw-away test store: no fsync (2 shared cores), no disk quota surprises.
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=1073741824",
                "--log-level=warn",
            ],
        )
        etcd.start()
        self._wait("etcd", lambda: self._http_ok(f"{etcd_url}/health"), timeout, [etcd])
        pki = self.pki
        policy = self.folder / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        apiserver = self._process(
            "kube-apiserver",
            [
                str(self.binaries.path("kube-apiserver")),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_file}",
                f"--service-account-issuer=https://{LOOPBACK}:{self.api_port}",
                f"--service-account-key-file={pki / 'service-account.pub'}",
                f"--service-account-signing-key-file={pki / 'service-account.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--profiling=false",
                # No kubelet here: the API server never dials one; no cloud, no aggregation
                # to remote API services.
                "--endpoint-reconciler-type=none",
                # Webhooks and aggregated APIs behind a Service are reached at the Service's
                # endpoints (none here without pods), never at its ClusterIP.
                "--enable-aggregator-routing=true",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--v=1",
            ],
        )
        apiserver.start()
        self._wait("kube-apiserver", self._ready, timeout, [etcd, apiserver])
        self._write_kubeconfig(self.kubeconfig, "admin")
        self._write_kubeconfig(self.folder / "controller-manager.kubeconfig", "controller-manager")
        controller_manager = self._process(
            "kube-controller-manager",
            [
                str(self.binaries.path("kube-controller-manager")),
                f"--kubeconfig={self.folder / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.folder / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.folder / 'controller-manager.kubeconfig'}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={free_port()}",
                f"--cert-dir={pki}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'service-account.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Only what the tests rely on: namespaces finalize, owners collect their
                # dependents, every namespace gets its default ServiceAccount, tokens for
                # legacy token Secrets and kube-root-ca.crt. Nothing that reaches a network.
                "--controllers=" + ",".join(self.controllers),
                "--profiling=false",
                "--v=1",
            ],
        )
        controller_manager.start()
        self._wait(
            "kube-controller-manager",
            self._controllers_working,
            timeout,
            [etcd, apiserver, controller_manager],
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def failed_processes(self) -> list[Process]:
        return [p for p in self.processes if p.popen is not None and not p.alive()]

    # --- clients ------------------------------------------------------------------------

    def ssl_context(self, user: str = "admin") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.pki / f"{user}.crt"), str(self.pki / f"{user}.key"))
        return context

    def request(
        self, method: str, path: str, body: Any = None, *, user: str = "admin"
    ) -> tuple[int, Any]:
        """One call to the API server over loopback as ``user``; returns status and JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (https to our own loopback server)
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, context=self.ssl_context(user), timeout=30
            ) as response:
                raw = response.read()
                status = int(response.status)
        except urllib.error.HTTPError as error:
            raw = error.read()
            status = error.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def kubeconfig_for_token(self, path: Path, token: str, namespace: str = "default") -> Path:
        """A kubeconfig that logs in with a bearer token (a ServiceAccount's, say)."""
        config = self._kubeconfig_body(
            {"token": token},
            namespace=namespace,
        )
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def client_kubeconfig(
        self, slug: str, common_name: str, organizations: Sequence[str] = ()
    ) -> Path:
        """A kubeconfig with a new client certificate of the cluster's CA (a kubelet's
        ``system:node:<name>`` in ``system:nodes``, say); written to ``<slug>.kubeconfig``."""
        assert self.authority is not None, "start() first"
        self.authority.issue(slug, common_name, organizations=organizations)
        path = self.folder / f"{slug}.kubeconfig"
        self._write_kubeconfig(path, slug)
        return path

    # --- internals ----------------------------------------------------------------------

    def _process(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.logs / f"{name}.log")
        self.processes.append(process)
        return process

    def _make_pki(self) -> None:
        ca = self.authority = CertificateAuthority(self.pki, "Kubernetes CA")
        ca.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            ips=[LOOPBACK, str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))],
            dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
        )
        ca.issue("admin", "mailflow-test-admin", organizations=["system:masters"])
        ca.issue(
            "controller-manager",
            "system:kube-controller-manager",
            organizations=["system:masters"],
        )
        signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.pki / "service-account.key").write_bytes(_pem_key(signing))
        (self.pki / "service-account.pub").write_bytes(
            signing.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def _kubeconfig_body(self, user: dict[str, str], namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mailflow-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [
                {
                    "name": "mailflow-test",
                    "context": {"cluster": "mailflow-test", "user": "user", "namespace": namespace},
                }
            ],
            "current-context": "mailflow-test",
        }

    def _write_kubeconfig(self, path: Path, user: str) -> None:
        body = self._kubeconfig_body(
            {
                "client-certificate": str(self.pki / f"{user}.crt"),
                "client-key": str(self.pki / f"{user}.key"),
            }
        )
        path.write_text(yaml.safe_dump(body))
        path.chmod(0o600)

    def _http_ok(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def _ready(self) -> bool:
        try:
            status, _ = self.request("GET", "/readyz")
        except (OSError, ssl.SSLError):
            return False
        return status == 200

    def _controllers_working(self) -> bool:
        status, _ = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        if status != 200:
            return False
        status, _ = self.request("GET", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
        return status == 200

    def _wait(
        self, what: str, check: Callable[[], bool], timeout: float, watched: list[Process]
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for process in watched:
                if not process.alive():
                    raise RuntimeError(
                        f"{process.name} exited while waiting for {what} "
                        f"(log: {process.log_file}):\n{process.tail()}"
                    )
            time.sleep(0.2)
        raise RuntimeError(
            f"{what} not ready after {timeout:.0f}s; logs in {self.logs}:\n"
            + "\n".join(f"--- {p.name}\n{p.tail()}" for p in watched)
        )


# Metadata of every request, once (at ResponseComplete, or at the start of a watch), so the
# RBAC tests can list what a ServiceAccount did; the system's own chatter is left out.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    users: [system:kube-controller-manager, system:apiserver]
  - level: None
    nonResourceURLs: ["/readyz*", "/healthz*", "/livez*"]
  - level: Metadata
"""

CONTROLLERS: tuple[str, ...] = (
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
)
