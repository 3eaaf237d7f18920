"""Real DNSSEC for the tests: zones signed by ldns-signzone, served by NSD, validated by unbound.

`SignedDns` takes zones as records (like `peers.DnsServer`) and for each signed zone makes
a KSK and a ZSK (`ldns-keygen`, ECDSA P-256: milliseconds), signs the zone with signature
dates the test chooses (`ldns-signzone -i/-e`: expired RRSIGs are a real expired zone),
optionally tampers with the signed file afterwards (a bogus signature), serves every zone
with NSD and starts unbound on another loopback port as the validating resolver: one stub
zone per test zone pointing at NSD, the DS of each signed zone's own KSK as its trust
anchor. Unsigned zones are under no trust anchor, so unbound answers them without AD
(insecure), as it does for an unsigned zone on the internet. The root itself is a stub to
NSD, which refuses it: nothing ever leaves 127.0.0.1.
"""

from __future__ import annotations

import datetime
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from peers import (
    CLIENT_TIMEOUT,
    LOCALHOST,
    START_TIMEOUT,
    DnsServer,
    _Process,
    _stop,
    _tail,
    free_port,
    require,
)

__all__ = ["SignedDns"]

_STAMP = "%Y%m%d%H%M%S"


def _stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime(_STAMP)


class _SignedNsd(DnsServer):
    """NSD serving the already signed zone files that `SignedDns` wrote."""

    def __init__(self, zone_files: Mapping[str, str], ttl: int) -> None:
        super().__init__({name: [] for name in zone_files}, ttl=ttl)
        self._files = zone_files

    def _zone_file(self, name: str, records: list[str]) -> str:
        return self._files[name]


class SignedDns(_Process):
    """NSD with signed and unsigned zones, and unbound validating them on its own port.

    ``signed``: the zones to sign (the others stay unsigned). ``expired``: signed zones whose
    signatures expired three days ago. ``tampered``: zone -> (text, replacement) applied to the
    signed zone file, to make a signature bogus.
    """

    def __init__(
        self,
        zones: Mapping[str, Iterable[str]],
        *,
        signed: Iterable[str],
        expired: Iterable[str] = (),
        tampered: Mapping[str, tuple[str, str]] | None = None,
        ttl: int = 60,
    ) -> None:
        self.zones = {name.rstrip(".").lower(): list(records) for name, records in zones.items()}
        self.signed = {name.rstrip(".").lower() for name in signed}
        self.expired = {name.rstrip(".").lower() for name in expired}
        self.tampered = dict(tampered or {})
        self.ttl = ttl
        self.port = 0
        self.trust_anchors: dict[str, str] = {}
        self.nsd: _SignedNsd | None = None

    # --- signing ---------------------------------------------------------------------------

    def _run(self, *args: str, cwd: Path) -> str:
        done = subprocess.run(
            list(args), capture_output=True, text=True, timeout=CLIENT_TIMEOUT, cwd=cwd, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip()

    def _sign(self, name: str, text: str, folder: Path) -> str:
        keygen, signzone = require("ldns-keygen"), require("ldns-signzone")
        zone = folder / f"{name}.unsigned"
        zone.write_text(text)
        ksk = self._run(keygen, "-a", "ECDSAP256SHA256", "-k", name, cwd=folder)
        zsk = self._run(keygen, "-a", "ECDSAP256SHA256", name, cwd=folder)
        now = datetime.datetime.now(datetime.UTC)
        if name in self.expired:
            # Well past unbound's clock-skew allowance (10 % of the validity, at most
            # val-sig-skew-max, one day): expired a day ago would sit on that edge.
            inception, expiration = (
                now - datetime.timedelta(days=30),
                now - datetime.timedelta(days=3),
            )
        else:
            inception, expiration = (
                now - datetime.timedelta(hours=1),
                now + datetime.timedelta(days=30),
            )
        signed = folder / f"{name}.signed"
        self._run(
            signzone,
            "-i",
            _stamp(inception),
            "-e",
            _stamp(expiration),
            "-f",
            str(signed),
            str(zone),
            ksk,
            zsk,
            cwd=folder,
        )
        self.trust_anchors[name] = " ".join((folder / f"{ksk}.ds").read_text().split()[1:])
        result = signed.read_text()
        if name in self.tampered:
            old, new = self.tampered[name]
            if old not in result:
                raise RuntimeError(f"{old!r} is not in the signed zone {name}")
            result = result.replace(old, new)
        return result

    # --- unbound ---------------------------------------------------------------------------

    def _unbound_config(self, folder: Path, nsd_port: int) -> str:
        lines = [
            "server:",
            f"    interface: {LOCALHOST}@{self.port}",
            f"    port: {self.port}",
            "    do-ip4: yes",
            "    do-ip6: no",
            "    do-udp: yes",
            "    do-tcp: yes",
            '    username: ""',
            '    chroot: ""',
            f'    directory: "{folder}"',
            f'    pidfile: "{folder}/unbound.pid"',
            f'    logfile: "{folder}/unbound.log"',
            "    use-syslog: no",
            "    verbosity: 1",
            "    val-log-level: 2",
            "    num-threads: 1",
            "    so-reuseport: no",
            "    do-not-query-localhost: no",
            "    access-control: 127.0.0.0/8 allow",
            '    module-config: "validator iterator"',
            "    harden-dnssec-stripped: yes",
            "    qname-minimisation: no",
            "    trust-anchor-signaling: no",
            "    root-key-sentinel: no",
            "    outgoing-port-permit: 1024-65535",
        ]
        # unbound answers RFC 6761 names (test., invalid., ...) itself unless told not to.
        tops = sorted({name.rpartition(".")[2] for name in self.zones})
        lines += [f'    local-zone: "{top}." nodefault' for top in tops]
        for name, ds in sorted(self.trust_anchors.items()):
            lines.append(f'    trust-anchor: "{name}. {ds}"')
        for name in sorted(self.zones):
            lines += [
                "stub-zone:",
                f'    name: "{name}."',
                f"    stub-addr: {LOCALHOST}@{nsd_port}",
            ]
        lines += ["stub-zone:", '    name: "."', f"    stub-addr: {LOCALHOST}@{nsd_port}"]
        lines += ["remote-control:", "    control-enable: no"]
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        query = dns.message.make_query(f"{next(iter(self.zones))}.", "SOA", want_dnssec=True)
        try:
            reply = dns.query.udp(query, LOCALHOST, port=self.port, timeout=0.3)
        except (dns.exception.Timeout, OSError):
            return False
        return reply.rcode() in (dns.rcode.NOERROR, dns.rcode.SERVFAIL)

    def start(self) -> None:
        unbound = require("unbound")
        self._tmp = tempfile.TemporaryDirectory(prefix="mailflow-dnssec-")
        folder = Path(self._tmp.name)
        try:
            files: dict[str, str] = {}
            template = DnsServer({}, ttl=self.ttl)
            for name, records in self.zones.items():
                text = template._zone_file(name, records)
                files[name] = self._sign(name, text, folder) if name in self.signed else text
            self.nsd = _SignedNsd(files, self.ttl)
            self.nsd.start()
            self._start_unbound(unbound, folder, self.nsd.port)
        except BaseException:
            self.stop()
            raise

    def _start_unbound(self, unbound: str, folder: Path, nsd_port: int) -> None:
        failure = ""
        for attempt in range(3):
            self.port = free_port()
            conf = folder / "unbound.conf"
            conf.write_text(self._unbound_config(folder, nsd_port))
            checkconf = require("unbound-checkconf")
            self._run(checkconf, str(conf), cwd=folder)
            with (folder / "unbound.out").open("wb") as output:
                self._process = subprocess.Popen(
                    [unbound, "-d", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    break
                if self._answers():
                    return
                time.sleep(0.05)
            _stop(self._process)
            self._process = None
            failure = _tail(folder / "unbound.out") + _tail(folder / "unbound.log")
            if attempt == 2 or "address already in use" not in failure.lower():
                break
        raise RuntimeError(f"unbound did not start answering on port {self.port}:\n{failure}")

    def stop(self) -> None:
        if self.nsd is not None:
            self.nsd.stop()
            self.nsd = None
        super().stop()

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """One query to unbound with DO set (for the tests' own checks)."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        query.flags |= dns.flags.AD
        return dns.query.udp(query, LOCALHOST, port=self.port, timeout=2.0)
