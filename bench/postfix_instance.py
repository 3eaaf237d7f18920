"""A private Postfix instance in a temporary folder, relaying from a loopback port to a sink.

It never touches the system's instance: its own ``config_directory``, ``queue_directory``
and ``data_directory`` live in the folder, ``smtpd`` listens on one loopback port (set in
its own ``master.cf``), and it delivers everything to ``relayhost = [127.0.0.1]:<sink>``.
Durability is Postfix's default: ``cleanup`` fsyncs the queue file before ``smtpd``
answers ``250``. No service is chrooted (a chroot would need copies of system files in
the queue folder). As root, Postfix runs its daemons as ``mail_owner`` (``postfix``) and
its set-gid commands as ``postdrop``: the users that Debian's package created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["PostfixInstance", "main_cf", "master_cf"]

COMMAND_TIMEOUT = 60.0

# name, type, private, unpriv, chroot, wakeup, maxproc, command (+ args): Debian's defaults,
# without the chroot, minus the pipe transports nobody here uses.
_SERVICES: tuple[tuple[str, ...], ...] = (
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("local", "unix", "-", "n", "n", "-", "-", "local"),
    ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
)


def _postconf_default(name: str, fallback: str) -> str:
    postconf = shutil.which("postconf", path="/usr/sbin:/usr/bin:/sbin")
    if postconf is None:
        return fallback
    result = subprocess.run(
        [postconf, "-dh", name],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and value else fallback


def main_cf(
    folder: Path,
    *,
    relay_port: int,
    connection_reuse: bool,
    tls: bool,
    directories: Mapping[str, str] | None = None,
) -> str:
    """The instance's main.cf: loopback only, relays everything to [127.0.0.1]:relay_port.

    ``connection_reuse``: ``smtp_connection_cache_on_demand`` (Postfix's default, yes).
    ``tls``: ``smtp_tls_security_level = may`` (opportunistic STARTTLS, no checks), else
    ``none``. ``directories`` overrides where Postfix's own programs are (tests).
    """
    dirs = dict(directories or {})
    for name, fallback in (
        ("daemon_directory", "/usr/lib/postfix/sbin"),
        ("command_directory", "/usr/sbin"),
        ("meta_directory", "/etc/postfix"),
        ("shlib_directory", "/usr/lib/postfix"),
    ):
        dirs.setdefault(
            name, fallback if directories is not None else _postconf_default(name, fallback)
        )
    settings = {
        "compatibility_level": "3.6",
        "config_directory": str(folder / "etc"),
        "queue_directory": str(folder / "queue"),
        "data_directory": str(folder / "data"),
        **dirs,
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "postfix.bench.test",
        "mydomain": "bench.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:local delivery is disabled",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtp_connection_cache_on_demand": "yes" if connection_reuse else "no",
        "smtp_tls_security_level": "may" if tls else "none",
        "smtp_tls_loglevel": "0",
        "smtpd_tls_security_level": "none",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "maillog_file": str(folder / "maillog"),
        "maillog_file_prefixes": str(folder),
        # One instance per run: nothing is shared with the system's instance.
        "multi_instance_enable": "no",
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


def master_cf(smtpd_port: int) -> str:
    """The instance's master.cf: smtpd on 127.0.0.1:smtpd_port plus the internal services."""
    rows: list[tuple[str, ...]] = [
        (f"127.0.0.1:{smtpd_port}", "inet", "n", "-", "n", "-", "-", "smtpd")
    ]
    rows += list(_SERVICES)
    return "".join(" ".join(f"{field:<10}" for field in row).rstrip() + "\n" for row in rows)


class PostfixInstance:
    """``postfix -c <folder>/etc start`` … ``stop``, listening on 127.0.0.1:port."""

    def __init__(
        self,
        folder: Path,
        *,
        port: int,
        relay_port: int,
        connection_reuse: bool = True,
        tls: bool = False,
    ) -> None:
        self.folder = folder
        self.port = port
        self.relay_port = relay_port
        self.connection_reuse = connection_reuse
        self.tls = tls
        self.config_directory = folder / "etc"
        self.postfix = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin") or "postfix"
        self._started = False

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.postfix, "-c", str(self.config_directory), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            env={**os.environ, "MAIL_CONFIG": str(self.config_directory)},
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{self.log_tail()}"
            )
        return result

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return (self.folder / "maillog").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (mail_owner, setgid_group)")
        self.config_directory.mkdir(parents=True, exist_ok=True)
        for name in ("queue", "data"):
            (self.folder / name).mkdir(exist_ok=True)
        # Postfix wants its queue and data folders' parents owned by root, not world-writable.
        self.folder.chmod(0o755)
        (self.folder / "data").chmod(0o700)
        os.chown(self.folder / "data", _uid("postfix"), -1)
        (self.config_directory / "main.cf").write_text(
            main_cf(
                self.folder,
                relay_port=self.relay_port,
                connection_reuse=self.connection_reuse,
                tls=self.tls,
            )
        )
        (self.config_directory / "master.cf").write_text(master_cf(self.port))
        self._postfix("check")
        self._postfix("start")
        self._started = True

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._postfix("stop")
        # `postfix stop` returns before master has exited: wait (bounded) for it to go.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.master_pid()
            if pid is None or not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)

    def master_pid(self) -> int | None:
        try:
            return int((self.folder / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
