"""`mailflow relay` in its own process, as tests of the command line run it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from peers import free_port

CONNECTOR = """
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {{name: {name}, namespace: mail}}
spec:
  recipientDomains: {domains}
  destination: {{smartHost: {{host: 127.0.0.1, port: {port}}}}}
  tls: {{mode: Opportunistic}}
---
"""


def connector(name: str, domains: str, port: int) -> str:
    return CONNECTOR.format(name=name, domains=domains, port=port)


class RelayProcess:
    """`mailflow relay` in a subprocess, waited for until it accepts connections."""

    def __init__(
        self, folder: Path, manifests: str, *extra: str, spool: Path | None = None
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.spool = spool or folder / "spool"
        (folder / "manifests.yaml").write_text(manifests)
        self.log = folder / f"relay-{self.port}.log"
        script = Path(sys.executable).parent / "mailflow"
        self.command = [
            str(script),
            "relay",
            "--manifests",
            str(folder / "manifests.yaml"),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--spool",
            str(self.spool),
            "--hostname",
            "relay.test",
            "--retry-initial",
            "0.5",
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RelayProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"the relay did not start:\n{self.output()}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self.process = None
