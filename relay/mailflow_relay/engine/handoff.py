"""Hand-off: on stop, what is left in the spool goes to a peer relay over SMTP.

Each record leaves this spool only after the peer's ``250`` for it (the peer has then
stored it durably, the same promise this relay gave its client); a peer that takes some
recipients only gets those recorded as done here, and the rest stay. A failure keeps the
message in the spool for the next start: hand-off never loses a message, at worst it
duplicates one whose ``250`` was lost on the way back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiosmtplib

from mailflow_relay.engine.metrics import RelayMetrics
from mailflow_relay.engine.origin import origin_header
from mailflow_relay.engine.outcomes import final
from mailflow_relay.outbound.extensions import handoff_options
from mailflow_relay.queue.spool import RecipientState, RecipientStatus, SpooledMessage

__all__ = ["HandOff"]

logger = logging.getLogger(__name__)


@dataclass
class HandOff:
    peer: tuple[str, int]
    """The peer relay: the relay Service's name (resolved now) and port."""
    local_hostname: str
    timeout: float
    """Seconds for one message's whole SMTP transaction with the peer."""
    metrics: RelayMetrics
    update: Callable[..., Awaitable[object]]
    """Records recipients' states in the spool: ``update(queue_id, *states)``."""
    remove: Callable[[str], Awaitable[object]]
    """Removes a record from the spool once the peer has it."""
    load: Callable[[str], Awaitable[SpooledMessage]]
    """Reads the message with its body (the scan that found it holds envelopes only)."""

    async def run(self, messages: Sequence[SpooledMessage]) -> list[str]:
        """Re-inject ``messages`` into the peer; the queue ids it took whole."""
        if not messages:
            return []
        peer = self.peer
        logger.info("handing %d message(s) to %s:%d", len(messages), *peer)
        # One at a time: the peer is one relay, and each record waits for its own 250.
        return [m.queue_id for m in messages if await self._one(m)]

    async def _one(self, message: SpooledMessage) -> bool:
        peer = self.peer
        recipients = [r.address for r in message.pending]
        try:
            async with asyncio.timeout(self.timeout):
                smtp = aiosmtplib.SMTP(
                    hostname=peer[0],
                    port=peer[1],
                    local_hostname=self.local_hostname,
                    start_tls=False,
                    timeout=self.timeout,
                )
                # Loaded one at a time: memory holds one body, however long the queue.
                body = (await self.load(message.queue_id)).body
                async with smtp:
                    # The origin header keeps the message's age and client (origin.py).
                    body = origin_header(message) + body
                    refused = await _send(smtp, message, recipients, body)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            self.metrics.handoffs.labels("failed").inc()
            logger.warning("queue %s: hand-off failed, kept in the spool: %s", message.queue_id, e)
            return False
        if refused:
            # The peer took the message for some recipients only: those are done here
            # (recorded before anything else), the others stay for this relay.
            taken: list[RecipientState] = [
                final(r, RecipientStatus.DELIVERED, 250, f"2.0.0 handed off to {peer[0]}:{peer[1]}")
                for r in message.pending
                if r.address not in refused
            ]
            if taken:
                await self.update(message.queue_id, *taken)
            self.metrics.handoffs.labels("failed").inc()
            logger.warning(
                "queue %s: the peer refused %s; kept in the spool for them",
                message.queue_id,
                sorted(refused),
            )
            return False
        await self.remove(message.queue_id)
        self.metrics.handoffs.labels("accepted").inc()
        logger.info("queue %s: handed off to %s:%d", message.queue_id, *peer)
        return True


async def _send(
    smtp: aiosmtplib.SMTP, message: SpooledMessage, recipients: Sequence[str], body: bytes
) -> dict[str, aiosmtplib.SMTPResponse]:
    """MAIL, RCPT, DATA with the sender's parameters (SMTPUTF8, BODY, DSN); the refused."""
    mail_options, rcpt_options = handoff_options(message.parameters, recipients)
    encoding = "utf-8" if message.parameters.mail.smtputf8 else "ascii"
    await smtp.mail(message.sender, options=mail_options, encoding=encoding)
    refused: dict[str, aiosmtplib.SMTPResponse] = {}
    for recipient in recipients:
        try:
            await smtp.rcpt(recipient, options=rcpt_options[recipient], encoding=encoding)
        except aiosmtplib.SMTPRecipientRefused as e:
            refused[recipient] = aiosmtplib.SMTPResponse(e.code, e.message)
    if len(refused) == len(recipients):
        await smtp.rset()
        raise aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(r.code, r.message, a) for a, r in refused.items()]
        )
    await smtp.data(body)
    return refused
