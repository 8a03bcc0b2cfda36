"""The fault proxy the transport tests use: each mode does what it says, against an echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.fault_proxy import FaultProxy


@dataclass
class Echo:
    """Answers every read with the same bytes upper-cased; remembers each read."""

    port: int = 0
    reads: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            self.reads.append(chunk)
            writer.write(chunk.upper())
            await writer.drain()
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    echo = Echo()
    server = await asyncio.start_server(echo.serve, "127.0.0.1", 0)
    echo.port = server.sockets[0].getsockname()[1]
    async with server:
        yield echo


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_pass_through_forwards_both_ways(echo: Echo) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await _connect(proxy)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"HELLO"
        writer.close()
    assert proxy.connections == 1


async def test_split_writes_delivers_client_bytes_in_segments_of_the_given_size(echo: Echo) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.split_writes(4, delay_s=0.05)
        reader, writer = await _connect(proxy)
        writer.write(b"0123456789ab")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"0123456789AB"
        writer.close()
    assert b"".join(echo.reads) == b"0123456789ab"
    assert [len(read) for read in echo.reads] == [4, 4, 4]


async def test_latency_still_forwards_everything(echo: Echo) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.add_latency(0.01)
        reader, writer = await _connect(proxy)
        writer.write(b"slow")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"SLOW"
        writer.close()


async def test_stall_holds_bytes_until_released_then_forwards_them(echo: Echo) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await _connect(proxy)
        proxy.stall()
        writer.write(b"held")
        answer = asyncio.ensure_future(reader.readexactly(4))
        done, _ = await asyncio.wait([answer], timeout=0.2)
        assert not done and echo.reads == []
        proxy.pass_through()
        assert await asyncio.wait_for(answer, 5) == b"HELD"
        writer.close()


async def test_drop_closes_the_connection_without_an_answer(echo: Echo) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.drop()
        reader, writer = await _connect(proxy)
        writer.write(b"anyone?")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert echo.reads == []


async def test_reset_aborts_the_connection_with_rst(echo: Echo) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.reset()
        reader, writer = await _connect(proxy)
        writer.write(b"anyone?")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert echo.reads == []
