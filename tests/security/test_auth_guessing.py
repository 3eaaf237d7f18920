"""Password guessing against a `mailflow relay` process with AUTH users (``--auth-dir``).

Issue 12, point 4. Before: 40 wrong passwords on one connection all got ``535`` with no
delay and no disconnect, 12-33 guesses per second from one address. Now, with the default
settings: the third failure in a session closes it with ``421 4.7.0``, and each new guess
from the same address waits longer (1 s, 2 s, 4 s, ... up to 30 s) before it is verified —
here seen by swaks, an independent client, as well as by a raw socket.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from pathlib import Path

import pytest

from mailflow_relay.inbound.passwords import hash_password
from peers import require, swaks
from relayproc import RelayProcess, connector
from smtpraw import RawClient, raw_connection
from support import run

PASSWORD = "correct horse battery staple"


def _no_verify() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _guess_on_one_connection(port: int, guesses: int) -> list[int]:
    codes: list[int] = []
    async with raw_connection(port, source="127.0.0.2") as client:
        assert (await client.command(b"STARTTLS"))[0] == 220
        async with asyncio.timeout(5):
            await client.writer.start_tls(_no_verify())
        assert (await client.command(b"EHLO guesser.example"))[0] == 250
        for n in range(guesses):
            code = await _auth(client, f"pw-7c1e-{n}")
            codes.append(code)
            if code == 421:
                break
    return codes


async def _auth(client: RawClient, password: str) -> int:
    blob = base64.b64encode(f"\0alice\0{password}".encode())
    await client.send(b"AUTH PLAIN " + blob + b"\r\n")
    code, _ = await client.reply(within=40)
    if code == 535:
        # The third failure is followed by 421 at once: look for it without waiting long.
        try:
            async with asyncio.timeout(0.5):
                line = await client.reader.readline()
        except TimeoutError:
            return code
        return int(line[:3]) if line[:3].isdigit() else code
    return code


@pytest.mark.slow  # about 20 s: the point of the delays
def test_guessing_is_cut_off_per_session_and_slowed_down_per_address(tmp_path: Path) -> None:
    require("swaks")
    users = tmp_path / "users"
    users.mkdir()
    (users / "alice").write_text(hash_password(PASSWORD))
    with RelayProcess(tmp_path, connector("all", '["*"]', 9), "--auth-dir", str(users)) as relay:
        codes = run(lambda: _guess_on_one_connection(relay.port, 40), within=60)
        # Three failures from 127.0.0.2 so far: the next guess waits 4 s, the one after 8 s.
        waits = []
        for n in range(2):
            started = time.monotonic()
            result = swaks(
                relay.port,
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "alice",
                "--auth-password",
                f"pw-7c1e-swaks-{n}",
                "--local-interface",
                "127.0.0.2",
                "--timeout",
                "40",
                check=False,
            )
            waits.append(time.monotonic() - started)
            assert result.returncode != 0
            assert "535 5.7.8" in result.stdout, result.stdout
        log = relay.output()
    assert codes == [535, 535, 421]
    assert 4.0 <= waits[0] < 10.0, waits
    assert 8.0 <= waits[1] < 16.0, waits
    assert "Closing the connection from 127.0.0.2 after 3 AUTH failures" in log
    assert "held back 8.0 s: 4 failure(s) from 127.0.0.2 recently" in log
    assert "pw-7c1e" not in log  # no password, nor part of one, in the log
