"""`mailflow queue list|hold|release|bounce` filters, on a real spool, through the CLI.

No relay runs here: the spool and the routing document the relay leaves in it
(engine/published.py) are made directly, so each filter is checked on its own, fast.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailflow_cli.main import main
from mailflow_relay.engine.published import publish
from mailflow_relay.queue.admin import FLUSH_REQUEST, PUBLISHED_DOCUMENT
from mailflow_relay.queue.spool import RecipientStatus, Spool
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    SmtpCredentials,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern


def connector(name: str, *recipients: str, auth: SmtpCredentials | None = None) -> Connector:
    return Connector(
        ref=ObjectRef("mail", name),
        generation=1,
        created="2024-01-01T00:00:00Z",
        enabled=True,
        recipient_patterns=tuple(DomainPattern.parse(p) for p in recipients),
        sender_patterns=(),
        destination=SmartHost(f"{name}.relay.example", 2525),
        tls=TlsPolicy(),
        auth=auth,
    )


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    spool = Spool(folder)
    spool.store("alice@corp.test", ["a@partner.test", "b@other.test"], b"Subject: 1\r\n\r\nx\r\n")
    spool.store("bob@corp.test", ["c@partner.test"], b"Subject: 2\r\n\r\nx\r\n")
    spool.store("", ["alice@corp.test"], b"Subject: bounce\r\n\r\nx\r\n")
    document = RoutingDocument(
        generation=3,
        connectors=(
            connector("partner", "partner.test", auth=SmtpCredentials("relay", "s3cret-password")),
            connector("corp", "corp.test"),
        ),
    )
    publish(folder, document)
    return folder


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["queue", *args], out, err)
    return status, out.getvalue(), err.getvalue()


def listed(spool_dir: Path, *filters: str) -> dict[str, list[str]]:
    status, out, err = run("list", "--spool", str(spool_dir), "-o", "json", *filters)
    assert status == 0, err
    return {m["sender"]: [r["address"] for r in m["recipients"]] for m in json.loads(out)}


def test_the_published_document_routes_as_the_relay_and_holds_no_secret(spool_dir: Path) -> None:
    text = (spool_dir / PUBLISHED_DOCUMENT).read_text()
    assert "s3cret-password" not in text
    assert RoutingDocument.from_json(text).generation == 3


def test_list_filters_by_connector_domain_sender_and_age(spool_dir: Path) -> None:
    assert set(listed(spool_dir)) == {"alice@corp.test", "bob@corp.test", ""}
    assert set(listed(spool_dir, "--connector", "mail/partner")) == {
        "alice@corp.test",
        "bob@corp.test",
    }
    assert set(listed(spool_dir, "--connector", "corp")) == {""}
    # b@other.test has no connector: the default route (the recipient's MX).
    assert set(listed(spool_dir, "--connector", "default")) == {"alice@corp.test"}
    assert set(listed(spool_dir, "--domain", "OTHER.test")) == {"alice@corp.test"}
    assert set(listed(spool_dir, "--sender", "bob@corp.test")) == {"bob@corp.test"}
    assert set(listed(spool_dir, "--sender", "@corp.test")) == {"alice@corp.test", "bob@corp.test"}
    assert set(listed(spool_dir, "--sender", "<>")) == {""}
    assert listed(spool_dir, "--older-than", "1h") == {}
    assert set(listed(spool_dir, "--older-than", "0s")) == {"alice@corp.test", "bob@corp.test", ""}
    assert set(listed(spool_dir, "--domain", "partner.test", "--sender", "bob@corp.test")) == {
        "bob@corp.test"
    }
    status, out, _ = run("list", "--spool", str(spool_dir), "--domain", "nowhere.test")
    assert (status, out) == (0, "no message matches --domain nowhere.test\n")


def test_older_than_counts_from_the_arrival(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    old = spool.store_with_header(
        "old@corp.test",
        ["d@partner.test"],
        lambda _: b"Subject: old\r\n\r\nx\r\n",
        arrived=datetime.now(UTC) - timedelta(hours=3),
    )
    assert listed(spool_dir, "--older-than", "2h") == {"old@corp.test": ["d@partner.test"]}
    status, _, err = run("hold", "--spool", str(spool_dir), "--older-than", "2h")
    assert status == 0, err
    assert [r.held for r in spool.load(old.queue_id).recipients] == [True]


def test_hold_release_and_bounce_mark_only_the_selected_recipients(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    first = next(m for m in spool.scan(repair=False) if m.sender == "alice@corp.test")
    status, out, err = run("hold", "--spool", str(spool_dir), "--connector", "partner")
    assert status == 0, err
    assert out.splitlines()[-1] == "2 recipient(s) held"
    assert (spool_dir / FLUSH_REQUEST).exists()
    held = {r.address: r.held for m in spool.scan(repair=False) for r in m.recipients}
    assert held == {
        "a@partner.test": True,
        "b@other.test": False,
        "c@partner.test": True,
        "alice@corp.test": False,
    }
    text = run("list", "--spool", str(spool_dir))[1]
    assert "<a@partner.test> pending [held]" in text

    status, out, _ = run("release", first.queue_id, "--spool", str(spool_dir))
    assert out.splitlines() == [
        f"{first.queue_id}: <a@partner.test> released: due now",
        "1 recipient(s) released",
    ]
    assert not spool.load(first.queue_id).recipient("a@partner.test").held

    status, out, _ = run(
        "bounce", first.queue_id, "--domain", "other.test", "--spool", str(spool_dir)
    )
    assert status == 0
    states = {r.address: r for r in spool.load(first.queue_id).recipients}
    assert states["b@other.test"].bounce_requested
    assert not states["a@partner.test"].bounce_requested
    # The relay does the bounce (with its hostname, through its failure path): not yet final.
    assert states["b@other.test"].status is RecipientStatus.PENDING


def test_a_bounce_takes_a_held_recipient_and_a_release_makes_a_deferred_one_due(
    spool_dir: Path,
) -> None:
    spool = Spool(spool_dir)
    message = next(m for m in spool.scan(repair=False) if m.sender == "bob@corp.test")
    later = datetime.now(UTC) + timedelta(hours=1)
    deferred = replace(
        message.recipients[0], status=RecipientStatus.DEFERRED, attempts=2, next_attempt=later
    )
    spool.update(message.queue_id, deferred)
    run("hold", message.queue_id, "--spool", str(spool_dir))
    (state,) = spool.load(message.queue_id).recipients
    assert (state.held, state.attempts, state.next_attempt) == (True, 2, later)
    run("release", message.queue_id, "--spool", str(spool_dir))
    (state,) = spool.load(message.queue_id).recipients
    assert (state.held, state.attempts, state.next_attempt) == (False, 2, None)
    run("hold", message.queue_id, "--spool", str(spool_dir))
    run("bounce", message.queue_id, "--spool", str(spool_dir))
    (state,) = spool.load(message.queue_id).recipients
    assert (state.held, state.bounce_requested) == (False, True)


def test_without_ids_or_filters_nothing_is_changed(spool_dir: Path) -> None:
    for action in ("hold", "release", "bounce"):
        status, _, err = run(action, "--spool", str(spool_dir))
        assert status == 2
        assert "no queue id and no filter" in err
        assert "--all" in err
    assert not any(r.held for m in Spool(spool_dir).scan(repair=False) for r in m.recipients)
    status, out, _ = run("hold", "--all", "--spool", str(spool_dir))
    assert (status, out.splitlines()[-1]) == (0, "4 recipient(s) held")


def test_filter_errors_name_the_option_and_the_fix(spool_dir: Path) -> None:
    status, _, err = run("list", "--spool", str(spool_dir), "--older-than", "soon")
    assert status == 2
    assert "--older-than: 'soon' is not an age" in err
    (spool_dir / PUBLISHED_DOCUMENT).unlink()
    status, _, err = run("hold", "--spool", str(spool_dir), "--connector", "partner")
    assert status == 2
    assert "--connector" in err
    assert "--routing FILE" in err
    assert len(err.strip().splitlines()) == 1
    status, out, _ = run("release", "0123456789abcd-0123456789abcdef", "--spool", str(spool_dir))
    assert (status, out) == (
        1,
        "0123456789abcd-0123456789abcdef: not in the spool (delivered, bounced or deleted)\n"
        "0 recipient(s) released\n",
    )


def test_show_gives_the_route_each_recipient_takes_now(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    message = next(m for m in spool.scan(repair=False) if m.sender == "alice@corp.test")
    status, out, err = run("show", message.queue_id, "--spool", str(spool_dir))
    assert status == 0, err
    assert "route now: mail/partner -> smart host partner.relay.example" in out
    assert "route now: default -> recipient MX (TLS " in out
    status, out, _ = run("show", message.queue_id, "--spool", str(spool_dir), "-o", "json")
    routes = {r["address"]: r["route"] for r in json.loads(out)["recipients"]}
    assert routes["a@partner.test"]["connector"] == "mail/partner"
    assert routes["b@other.test"]["connector"] == "default"
    # A new document in force changes the route shown: it is the relay's, now.
    publish(spool_dir, RoutingDocument(generation=4, connectors=(connector("all", "*"),)))
    status, out, _ = run("show", message.queue_id, "--spool", str(spool_dir))
    assert out.count("route now: mail/all -> ") == 2


def test_an_outcome_decided_before_a_hold_does_not_undo_it(spool_dir: Path) -> None:
    """The relay records a deferral it decided on a read from before `queue hold|bounce`:
    the marks the CLI wrote meanwhile stay."""
    spool = Spool(spool_dir)
    message = next(m for m in spool.scan(repair=False) if m.sender == "bob@corp.test")
    (before,) = message.recipients  # what the relay read when it started the attempt
    run("hold", message.queue_id, "--spool", str(spool_dir))
    later = datetime.now(UTC) + timedelta(hours=1)
    decided = replace(
        before, status=RecipientStatus.DEFERRED, attempts=1, next_attempt=later, held=False
    )
    (state,) = spool.update(message.queue_id, decided)
    assert (state.status, state.attempts, state.held) == (RecipientStatus.DEFERRED, 1, True)

    run("bounce", message.queue_id, "--spool", str(spool_dir))
    again = replace(decided, attempts=2)
    (state,) = spool.update(message.queue_id, again)
    assert (state.bounce_requested, state.held, state.next_attempt) == (True, False, None)
    (state,) = spool.load(message.queue_id).recipients
    assert (state.attempts, state.bounce_requested, state.next_attempt) == (2, True, None)


def test_a_queue_id_not_in_the_spool_does_not_stop_the_others(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    message = next(m for m in spool.scan(repair=False) if m.sender == "bob@corp.test")
    gone = "0123456789abcd-0123456789abcdef"
    status, out, _ = run("hold", gone, message.queue_id, "--spool", str(spool_dir))
    assert status == 1
    assert out.splitlines() == [
        f"{gone}: not in the spool (delivered, bounced or deleted)",
        f"{message.queue_id}: <c@partner.test> held: not delivered, not bounced until released",
        "1 recipient(s) held",
    ]
