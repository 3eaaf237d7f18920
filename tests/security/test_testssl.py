"""testssl.sh (Debian's package) against the relay's inbound STARTTLS.

An independent TLS scanner, speaking SMTP STARTTLS to a real `mailflow relay` process:
no protocol below TLS 1.2 is offered, and none of the weak cipher classes (NULL, anonymous,
EXPORT, LOW, 3DES/IDEA, RC4). A regression in the listener's TLS context fails here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from peers import require
from relayproc import RelayProcess, connector

PROTOCOLS_NOT_OFFERED = ["SSLv2", "SSLv3", "TLS1", "TLS1_1"]
CIPHER_CLASSES_NOT_OFFERED = [
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",
    "cipherlist_3DES_IDEA",
]


@pytest.mark.slow  # 30-90 s: testssl opens a few hundred handshakes
def test_testssl_finds_no_old_protocol_and_no_weak_cipher_on_the_listeners_starttls(
    tmp_path: Path,
) -> None:
    testssl = require("testssl")
    report = tmp_path / "testssl.json"
    with RelayProcess(
        tmp_path, connector("all", '["*"]', 9), "--accept-from", "127.0.0.1/32"
    ) as relay:
        result = subprocess.run(
            [
                testssl,
                "--quiet",
                "--warnings",
                "off",
                "--color",
                "0",
                "--protocols",
                "--standard",
                "--starttls",
                "smtp",
                "--openssl-timeout",
                "10",
                "--jsonfile",
                str(report),
                f"127.0.0.1:{relay.port}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert report.exists(), result.stdout + result.stderr
    findings = {entry["id"]: entry["finding"] for entry in json.loads(report.read_text())}
    for protocol in PROTOCOLS_NOT_OFFERED:
        assert findings.get(protocol, "").startswith("not offered"), (protocol, findings)
    assert findings.get("TLS1_2", "").startswith("offered"), findings
    for cipher_class in CIPHER_CLASSES_NOT_OFFERED:
        assert findings.get(cipher_class) == "not offered", (cipher_class, findings)
    assert "scanProblem" not in findings, findings
