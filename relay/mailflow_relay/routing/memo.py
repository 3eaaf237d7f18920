"""Routing decided once per recipient: the decisions a :class:`~.router.Router` already made.

A recipient is routed when the client names it (RCPT TO: refuse what has no route), when
its message's content arrives (DKIM: does every route opt out of signing?) and when it is
delivered. A decision depends on nothing but the routing document and the message's
(recipient, sender, client), so the same question asked again of the same Router gets
the decision already made — the one the client was answered with — instead of a new
walk of the tables. A new document builds a new Router, with nothing remembered: a
decision is never reused across documents ("unless the document changed"). A hand-off
whose origin names another client asks another question (the client is in the key).

The memo is bounded (a client controls how many distinct recipients it names): past
``limit`` entries the oldest is forgotten, which costs only a lookup later.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["DEFAULT_LIMIT", "DecisionMemo"]

DEFAULT_LIMIT = 20_000
"""Enough for the recipients of every message in flight on a busy relay (RFC 5321 asks a
server to take at least 100 per message), a few MiB at most."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DecisionMemo(Generic[K, V]):
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self._decided: dict[K, V] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._decided)

    def get(self, key: K, decide: Callable[[], V]) -> V:
        """The decision for ``key``: the one made before, else ``decide()`` (remembered)."""
        try:
            decision = self._decided[key]
        except KeyError:
            pass
        else:
            self.hits += 1
            return decision
        decision = decide()  # may raise (a malformed address): nothing is remembered then
        self.misses += 1
        if len(self._decided) >= self.limit:
            # Dicts keep insertion order: the first key is the oldest decision.
            del self._decided[next(iter(self._decided))]
        self._decided[key] = decision
        return decision
