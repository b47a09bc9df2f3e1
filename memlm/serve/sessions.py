"""Sessions: named streams whose memory State survives between requests.

A request that names a session continues the stream from that session's State (XL memory, kNN
stores, key/value cache) instead of reading its history again. Sessions are capped in number
and in the bytes their states hold; past either cap the least recently used are evicted, and
their ids are remembered (up to `remembered` of them) so that a later request for one is told
it was evicted rather than that it never existed.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from memlm.state import State


class SessionError(Exception):
    """A request names a session that cannot be used: `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def state_bytes(state: State | None) -> int:
    """Bytes held by a state's tensors and its writable kNN stores."""
    if state is None:
        return 0
    total = state.row_start.numel() * state.row_start.element_size()
    for layer in state.layers:
        total += sum(t.numel() * t.element_size() for t in layer.tensors().values())
    for store in state.stores.values():
        if not store.shared:
            total += sum(t.numel() * t.element_size() for t in store.state_dict().values() if hasattr(t, "numel"))
    return total


@dataclass
class Session:
    id: str
    state: State | None = None
    """The stream's memory after everything it has read and written; None before its first request."""
    tokens: int = 0
    """Tokens the stream has read (prompts and completions)."""
    busy: bool = False
    """A request is using it: it is neither evicted nor given to a second request meanwhile."""


class SessionStore:
    def __init__(self, max_sessions: int = 64, max_bytes: int = 2 ** 30, remembered: int = 4096):
        if max_sessions < 1 or max_bytes < 1:
            raise ValueError(f"max_sessions and max_bytes must be positive, got {max_sessions} and {max_bytes}")
        self.max_sessions, self.max_bytes, self.remembered = max_sessions, max_bytes, remembered
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def create(self) -> str:
        """A new, empty session; may evict the least recently used one."""
        with self._lock:
            session_id = "sess-" + secrets.token_hex(8)
            self._sessions[session_id] = Session(session_id)
            self._sizes[session_id] = 0
            self._evict()
            return session_id

    def acquire(self, session_id: str) -> Session:
        """The session, marked busy and most recently used; SessionError if it is unknown,
        evicted or serving another request."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                if session_id in self._evicted:
                    raise SessionError(f"session {session_id!r} was evicted (least recently used): start a new one",
                                       410)
                raise SessionError(f"unknown session {session_id!r}", 404)
            if session.busy:
                raise SessionError(f"session {session_id!r} is serving another request", 409)
            session.busy = True
            self._sessions.move_to_end(session_id)
            return session

    def release(self, session: Session, state: State | None, tokens: int) -> None:
        """Store the session's state after a request (state None: unchanged) and evict past the caps."""
        with self._lock:
            if state is not None:
                session.state, session.tokens = state, session.tokens + tokens
            session.busy = False
            if session.id in self._sessions:
                self._sizes[session.id] = state_bytes(session.state)
                self._evict()

    def delete(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise SessionError(f"unknown session {session_id!r}", 404)
            self._sizes.pop(session_id, None)

    def _evict(self) -> None:
        """Drop least recently used idle sessions while over either cap (a session larger than
        max_bytes alone is dropped too: the caps are hard)."""
        while len(self._sessions) > self.max_sessions or sum(self._sizes.values()) > self.max_bytes:
            victim = next((s for s in self._sessions.values() if not s.busy), None)
            if victim is None:
                return  # every session is serving a request: evict after it
            del self._sessions[victim.id]
            self._sizes.pop(victim.id, None)
            self._evicted[victim.id] = None
            while len(self._evicted) > self.remembered:
                self._evicted.popitem(last=False)
