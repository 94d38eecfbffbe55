"""uvicorn's h11 protocol with a header deadline: a connection must deliver a request's headers within
``HEADER_TIMEOUT_S`` of opening (or of its last answer), however slowly it trickles bytes in, else it is closed.
uvicorn alone has no such limit: its keep-alive timer restarts on every byte received, and a new connection that
sends nothing has none at all, so idle or slow-header connections would pile up without end."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tritonsd.serve import limits


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s: float = limits.HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = None
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in (the body has its own idle timeout: BodyLimit)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout_s: float):
    """The protocol with its own deadline (a subclass per server: tests run servers with short ones)."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
