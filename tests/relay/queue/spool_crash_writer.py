"""The child process of the spool crash test: spool, update and remove until killed.

Run as ``python spool_crash_writer.py SPOOL_DIR SEED``. Each line on stdout is printed
and flushed only after the spool call it reports has returned, so it is exactly what
the relay would have acknowledged:

- ``stored <queue id> <sha256 of the body>`` after :meth:`Spool.store`;
- ``deferred <queue id>`` after the first recipient was durably marked DEFERRED;
- ``removing <queue id>`` before both recipients are marked delivered and the message
  removed, so the parent knows that a missing message may have been removed;
- ``removed <queue id>`` after both recipients were delivered and the message removed.

The loop is bounded in count and time so that a parent that fails to kill the child
does not leave it running.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from datetime import UTC, datetime, timedelta

from mailflow_relay.queue.spool import RecipientState, RecipientStatus, Spool

MAX_MESSAGES = 5_000
MAX_SECONDS = 20.0
RECIPIENTS = ("a@example.com", "b@example.net")


def main(directory: str, seed: int) -> None:
    rng = random.Random(seed)
    spool = Spool(directory)
    deadline = time.monotonic() + MAX_SECONDS
    for n in range(MAX_MESSAGES):
        if time.monotonic() > deadline:
            break
        # Sizes from empty to a megabyte, so that kills land inside long writes too.
        body = rng.randbytes(rng.choice((0, 100, 10_000, 300_000, 1_000_000)))
        message = spool.store("sender@example.org", RECIPIENTS, body)
        print(f"stored {message.queue_id} {hashlib.sha256(body).hexdigest()}", flush=True)

        deferred = RecipientState(
            RECIPIENTS[0],
            RecipientStatus.DEFERRED,
            attempts=1,
            next_attempt=datetime.now(UTC) + timedelta(minutes=5),
            last_reply_code=451,
            last_reply_text="4.7.1 Try again later",
        )
        spool.update(message.queue_id, deferred)
        print(f"deferred {message.queue_id}", flush=True)

        if n % 3 == 2:
            # Announced first: a kill after remove() but before "removed" may take it.
            print(f"removing {message.queue_id}", flush=True)
            spool.update(
                message.queue_id,
                *(
                    RecipientState(r, RecipientStatus.DELIVERED, attempts=2, last_reply_code=250)
                    for r in RECIPIENTS
                ),
            )
            spool.remove(message.queue_id)
            print(f"removed {message.queue_id}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
