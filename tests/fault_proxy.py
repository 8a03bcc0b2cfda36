"""A TCP proxy that injects network faults between a client and an upstream server, for tests.

    async with FaultProxy("127.0.0.1", upstream_port) as proxy:
        client_talks_to(proxy.url)
        proxy.stall()          # bytes are read but neither forwarded nor answered ...
        proxy.pass_through()   # ... until released (what was held is forwarded, in order)

Modes (switchable at any time; each applies to the next chunk read on every connection, open or new):

- `pass_through()`: forward both ways untouched.
- `add_latency(s)`: sleep `s` before forwarding each chunk, both ways.
- `split_writes(n, delay_s)`: forward client->upstream bytes in segments of `n` bytes, `delay_s` apart.
- `stall()`: accept and read, forward and answer nothing until `pass_through()` (or another mode).
- `drop()`: close the connection silently (FIN) when the client sends.
- `reset()`: close the connection with a TCP RST (SO_LINGER 0) when the client sends.

Also here: `exchange()`, which sends a raw HTTP request in several writes with pauses between
them (to make a server see a body in several TCP segments) and reads the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import orjson

_CHUNK = 65536


class Mode(enum.Enum):
    PASS_THROUGH = "pass_through"
    LATENCY = "latency"
    SPLIT_WRITES = "split_writes"
    STALL = "stall"
    DROP = "drop"
    RESET = "reset"


class FaultProxy:
    """Listens on 127.0.0.1 (random port) and forwards each connection to `upstream_host:upstream_port`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode = Mode.PASS_THROUGH
        self.connections = 0  # accepted so far
        self._latency_s = 0.0
        self._segment_bytes = 0
        self._segment_delay_s = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- modes -------------------------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward untouched; releases a stall (held bytes are forwarded in order)."""
        self._switch(Mode.PASS_THROUGH)

    def add_latency(self, seconds: float) -> None:
        self._latency_s = seconds
        self._switch(Mode.LATENCY)

    def split_writes(self, segment_bytes: int, delay_s: float) -> None:
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be at least 1")
        self._segment_bytes, self._segment_delay_s = segment_bytes, delay_s
        self._switch(Mode.SPLIT_WRITES)

    def stall(self) -> None:
        self._switch(Mode.STALL)
        self._flowing.clear()

    def drop(self) -> None:
        self._switch(Mode.DROP)

    def reset(self) -> None:
        self._switch(Mode.RESET)

    def _switch(self, mode: Mode) -> None:
        self.mode = mode
        self._flowing.set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._flowing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    # --- forwarding --------------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        # Its own task, so that closing the proxy can cancel it without asyncio's streams logging that.
        task = asyncio.create_task(self._forward(client_reader, client_writer))
        self._tasks.add(task)
        await asyncio.wait([task])
        self._tasks.discard(task)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            self._writers.add(upstream_writer)
            async with asyncio.TaskGroup() as both_ways:
                both_ways.create_task(self._pump(client_reader, upstream_writer, client_writer, upstream=True))
                both_ways.create_task(self._pump(upstream_reader, client_writer, client_writer, upstream=False))
        except* OSError:  # ConnectionError included: a peer went away, or a drop/reset ended the connection
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        """Copy reader -> writer chunk by chunk, applying the mode of the moment to each chunk."""
        while True:
            chunk = await reader.read(_CHUNK)
            if not chunk:
                if writer.can_write_eof() and not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            await self._flowing.wait()
            mode = self.mode
            if mode in (Mode.DROP, Mode.RESET) and upstream:
                if mode is Mode.RESET:
                    _abort_with_rst(client_writer)
                else:
                    client_writer.close()
                raise ConnectionResetError("connection closed by the fault proxy")
            if mode is Mode.LATENCY:
                await asyncio.sleep(self._latency_s)
            if mode is Mode.SPLIT_WRITES and upstream:
                await _write_in_segments(writer, chunk, self._segment_bytes, self._segment_delay_s)
            else:
                writer.write(chunk)
                await writer.drain()


async def _write_in_segments(writer: asyncio.StreamWriter, data: bytes, size: int, delay_s: float) -> None:
    for offset in range(0, len(data), size):
        if offset:
            await asyncio.sleep(delay_s)
        writer.write(data[offset : offset + size])
        await writer.drain()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --- raw HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    *,
    chunked: bool = False,
) -> bytes:
    """The request head (ending in the blank line); with `chunked`, the body must be sent with `chunked_body`.
    Headers as a mapping or as pairs (a name may repeat); written in latin-1, so a value holding U+0080..U+00FF is
    sent as those very bytes (how a test sends a header that is not UTF-8)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or []
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in pairs]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked_body(body: bytes, chunk_size: int) -> list[bytes]:
    """`body` as HTTP/1.1 chunks of `chunk_size` bytes, the last-chunk marker last: one write each."""
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in split(body, chunk_size)]
    return [*chunks, b"0\r\n\r\n"]


def split(data: bytes, size: int) -> list[bytes]:
    return [data[offset : offset + size] for offset in range(0, len(data), size)]


async def exchange(host: str, port: int, writes: Iterable[bytes], *, pause_s: float = 0.05) -> RawResponse:
    """Send each of `writes` separately, `pause_s` apart, then read the whole response (until EOF).

    A server that answers early and closes (413, 431, ...) stops the writing, not the reading.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for index, data in enumerate(writes):
            if index:
                await asyncio.sleep(pause_s)
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:
                break
        raw = await _read_until_eof(reader)
    finally:
        writer.transport.abort()
    return parse_response(raw)


async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(_CHUNK):
            received += chunk
    return bytes(received)


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(int(status_line.split()[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)
