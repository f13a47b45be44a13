"""A real local Kubernetes control plane: etcd + kube-apiserver on loopback.

Used by the tests and the demo (a development tool, not part of the product).
The flag set follows controller-runtime's envtest: RBAC authorization, a
generated CA and serving certificate, a service-account signing key (so
TokenRequest works for ServiceAccounts), and one static admin token in
``system:masters`` for the kubeconfig. There is no controller-manager or
kubelet: the operator owns its pods and a local pod runner plays the kubelet.

``ControlPlane`` is a context manager; leaving it stops both processes (their
whole process groups) and removes the work directory, also when a test fails.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import binaries
from .processes import stop_group
from .waiting import wait_until

ADMIN_USER = "seedfork-admin"


def kubeconfig_for(server: str, ca_file: str, user: str, token: str) -> dict:
    """A kubeconfig for ``server`` (trusting ``ca_file``) as ``user`` with a bearer ``token``: the admin's,
    or a pod's ServiceAccount token (the pod runner's)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(cert_dir: Path) -> None:
    """A throw-away CA, a serving certificate for 127.0.0.1/localhost, and an SA signing key."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=seedfork-local-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=cert_dir,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        cwd=cert_dir,
    )
    (cert_dir / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "apiserver.crt",
        cwd=cert_dir,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=cert_dir)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=cert_dir)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver on 127.0.0.1 in a temporary directory."""

    workdir: Path | None = None
    start_timeout: float = 90.0
    verbose: bool = False
    url: str = ""
    kubeconfig: Path = field(default=Path())
    token: str = ""
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ca_path(self) -> Path:
        return self._dir / "pki" / "ca.crt"

    def start(self) -> None:
        apiserver_bin = binaries.ensure("kube-apiserver")
        etcd_bin = binaries.ensure("etcd")
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="seedfork-cp-")
            self.workdir = Path(self._tmp.name)
        self._dir = Path(self.workdir)
        (self._dir / "logs").mkdir(parents=True, exist_ok=True)
        make_certs(self._dir / "pki")
        self.token = secrets.token_hex(24)
        (self._dir / "tokens.csv").write_text(f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                str(etcd_bin),
                "--name=default",
                f"--data-dir={self._dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait(lambda: self._http_ok(f"{etcd_url}/health"), "etcd /health")

        pki = self._dir / "pki"
        self.url = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver_bin),
                f"--etcd-servers={etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--secure-port={api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--authorization-mode=RBAC",
                f"--token-auth-file={self._dir / 'tokens.csv'}",
                # No controller-manager runs, so no default ServiceAccount would ever appear.
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-issuer={self.url}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--v=0" if not self.verbose else "--v=2",
            ],
        )
        self._wait(self._ready, "kube-apiserver /readyz")
        self.kubeconfig = self._dir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(self.kubeconfig_dict()))

    def kubeconfig_dict(self, user: str = ADMIN_USER, token: str | None = None) -> dict:
        return kubeconfig_for(self.url, str(self.ca_path), user, token or self.token)

    def version(self) -> str:
        import json

        return json.loads(self._get("/version"))["gitVersion"]

    def _get(self, path: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.read()

    def _ready(self) -> bool:
        try:
            return self._get("/readyz") == b"ok"
        except OSError:
            return False

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self._dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.name = name  # type: ignore[attr-defined]
        self._procs.append(proc)

    def _wait(self, check, what: str) -> None:
        def ready() -> bool:
            for proc in self._procs:  # a process that exited ends the wait: it will never be ready
                if proc.poll() is not None:
                    tail = (self._dir / "logs" / f"{proc.name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{proc.name} exited with {proc.returncode} while waiting for {what}:\n{tail}")
            return check()

        wait_until(ready, self.start_timeout, what, interval=0.2)

    def stop(self) -> None:
        # apiserver first, then etcd; each in its own session so the group goes with it.
        for proc in reversed(self._procs):
            stop_group(proc, 15)
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
