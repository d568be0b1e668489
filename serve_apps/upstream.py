"""A minimal HTTP/1.1 client for the gateway's one job: POST a body to an engine, relay the reply.

aiohttp's client spends about 100 us of CPU per request on machinery the gateway never
uses (cookies, redirects, tracing hooks, multidict headers). On a 2-core machine that is a
third of the gateway's budget, so this module speaks keep-alive HTTP/1.1 itself over
``asyncio.Protocol`` with ``httptools`` (the parser uvicorn uses): one pre-built request
write, a C parser, and the body handed over in the chunks the engine sent.

``UpstreamUnavailable`` means nothing of the response arrived (refused, reset before the
status line, connect timeout): the caller may safely retry elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools


class UpstreamUnavailable(ConnectionError):
    """The engine could not be reached, or dropped the connection before answering."""


class UpstreamBroken(ConnectionError):
    """The engine's response broke off after it had started."""


class UpstreamResponse:
    """One response as it arrives: status and content type first, then body chunks."""

    __slots__ = ("status", "content_type", "keep_alive", "_chunks", "_complete", "_error", "_waiter", "_headers_done", "_last_data", "_watchdog")

    def __init__(self) -> None:
        self.status = 0
        self.content_type = b"application/json"
        self.keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None
        self._last_data = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._headers_done = asyncio.get_running_loop().create_future()

    # -- fed by the protocol ------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _add_chunk(self, data: bytes) -> None:
        self._last_data = time.monotonic()
        self._chunks.append(data)
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if self._complete:
            return
        self._complete = True
        self._error = error
        if not self._headers_done.done():
            if error is None:
                self._headers_done.set_result(None)
            else:
                self._headers_done.set_exception(error)
        self._wake()

    # -- read by the gateway ------------------------------------------------------------
    async def wait_headers(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._headers_done), timeout_s)
        except TimeoutError:
            raise UpstreamUnavailable(f"no response within {timeout_s:.0f}s") from None

    async def chunks(self, timeout_s: float) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, those already buffered joined into one; raises
        ``UpstreamBroken`` if the body breaks off or the engine stays silent for ``timeout_s``.

        A stream is hundreds of chunks, so the silence limit is one watchdog timer per
        response that re-arms itself, not a ``wait_for`` (a timer and a cancel) per chunk;
        and it is armed only once the reader has to wait at all.
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._chunks:
                    chunks = self._chunks
                    yield chunks.popleft() if len(chunks) == 1 else b"".join([chunks.popleft() for _ in range(len(chunks))])
                    continue
                if self._complete:
                    if self._error is not None:
                        raise UpstreamBroken(str(self._error))
                    return
                if self._watchdog is None:
                    self._last_data = time.monotonic()
                    self._watchdog = loop.call_later(timeout_s, self._check_silence, timeout_s)
                self._waiter = loop.create_future()
                await self._waiter
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()

    def _check_silence(self, timeout_s: float) -> None:
        silent_for = time.monotonic() - self._last_data
        waiting = self._waiter is not None and not self._waiter.done()
        if silent_for >= timeout_s and waiting:
            self._waiter.set_exception(UpstreamBroken(f"engine silent for {timeout_s:.0f}s"))
            return
        # Data came meanwhile, or the reader is busy relaying what came (a slow client).
        delay = timeout_s - silent_for if silent_for < timeout_s else timeout_s
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_silence, timeout_s)

    async def read(self, timeout_s: float) -> bytes:
        if self._complete and self._error is None:  # the usual case: the whole body came with the headers
            return b"".join(self._chunks)
        parts = [chunk async for chunk in self.chunks(timeout_s)]
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self._content_type: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            started = self.response.status != 0
            error = (UpstreamBroken if started else UpstreamUnavailable)(f"connection closed: {exc!r}")
            self.response._finish(error)
            self.response = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.response is not None:
                self.response._finish(UpstreamBroken(f"bad HTTP from engine: {exc}"))
                self.response = None
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._content_type = value

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        response.status = self.parser.get_status_code()
        response.keep_alive = self.parser.should_keep_alive()
        if self._content_type is not None:
            response.content_type = self._content_type
        if not response._headers_done.done():
            response._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._add_chunk(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        if response is not None:
            response._finish()

    def send(self, payload: bytes) -> UpstreamResponse:
        self._content_type = None
        self.response = UpstreamResponse()
        self.transport.write(payload)
        return self.response

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


IDLE_LIMIT_S = 30.0  # below every common server keep-alive timeout (aiohttp 75 s, uvicorn 5 s is the outlier)


class UpstreamPool:
    """Idle keep-alive connections to one engine, reused most-recent first.

    A connection idle longer than ``IDLE_LIMIT_S`` is dropped rather than reused: the
    engine may be closing it at that very moment, and a request written into a closing
    socket fails for no fault of the engine.
    """

    def __init__(self, host: str, port: int, connect_timeout_s: float, idle_limit_s: float = IDLE_LIMIT_S) -> None:
        self.host = host
        self.port = port
        self.host_header = f"{host}:{port}".encode()
        self.connect_timeout_s = connect_timeout_s
        self.idle_limit_s = idle_limit_s
        self._idle: list[tuple[_Connection, float]] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None
        return connection

    async def post(self, path: bytes, body: bytes, request_id: bytes) -> tuple[UpstreamResponse, _Connection]:
        """Send the request on an idle or new connection; give the connection back with ``release``."""
        connection = None
        fresh_after = time.monotonic() - self.idle_limit_s
        while self._idle:
            candidate, idle_since = self._idle.pop()
            if not candidate.closed and idle_since > fresh_after:
                connection = candidate
                break
            candidate.close()
        if connection is None:
            connection = await self._connect()
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Request-Id: %s\r\n\r\n" % (
            path, self.host_header, len(body), request_id,
        )  # fmt: skip
        return connection.send(head + body), connection

    def release(self, connection: _Connection, response: UpstreamResponse) -> None:
        """Keep the connection if its response was read to the end and the engine allows it."""
        if connection.closed or not response._complete or response._error or not response.keep_alive:
            connection.close()
        else:
            self._idle.append((connection, time.monotonic()))

    def close(self) -> None:
        for connection, _ in self._idle:
            connection.close()
        self._idle.clear()
