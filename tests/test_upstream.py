"""The gateway's HTTP/1.1 client against a real socket server that streams on a script."""

from __future__ import annotations

import asyncio

import pytest

from serve_apps.upstream import UpstreamBroken, UpstreamPool

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(script: list[tuple[float, bytes]]) -> asyncio.Server:
    """A server that answers any request with ``script``: (delay before, bytes) steps."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for delay, data in script:
            await asyncio.sleep(delay)
            writer.write(data)
        await asyncio.sleep(5)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _stream(script: list[tuple[float, bytes]], timeout_s: float) -> list[bytes]:
    server = await _serve(script)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], connect_timeout_s=1.0)
    try:
        response, connection = await pool.post(b"/v1/completions", b"{}", b"r1")
        await response.wait_headers(1.0)
        try:
            return [chunk async for chunk in response.chunks(timeout_s)]
        finally:
            pool.release(connection, response)
    finally:
        pool.close()
        server.close()


def test_slow_but_steady_stream_outlives_the_silence_limit() -> None:
    """The limit is on silence, not on the stream's length: 6 chunks 0.1 s apart pass a 0.3 s limit."""
    script = [(0.0, _HEAD)] + [(0.1, _chunk(b"data: %d\n\n" % i)) for i in range(6)] + [(0.0, b"0\r\n\r\n")]
    chunks = asyncio.run(_stream(script, timeout_s=0.3))
    assert b"".join(chunks) == b"".join(b"data: %d\n\n" % i for i in range(6))


def test_engine_silent_mid_stream_breaks_the_stream() -> None:
    with pytest.raises(UpstreamBroken, match="silent for"):
        asyncio.run(_stream([(0.0, _HEAD + _chunk(b"data: 0\n\n"))], timeout_s=0.3))


def test_chunks_buffered_while_the_reader_was_busy_arrive_joined() -> None:
    async def run() -> list[bytes]:
        server = await _serve([(0.0, _HEAD + _chunk(b"a") + _chunk(b"b") + _chunk(b"c") + b"0\r\n\r\n")])
        pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], connect_timeout_s=1.0)
        try:
            response, connection = await pool.post(b"/v1/completions", b"{}", b"r1")
            await response.wait_headers(1.0)
            await asyncio.sleep(0.2)  # all three chunks and the end are parsed meanwhile
            chunks = [chunk async for chunk in response.chunks(1.0)]
            pool.release(connection, response)
            return chunks
        finally:
            pool.close()
            server.close()

    assert asyncio.run(run()) == [b"abc"]
