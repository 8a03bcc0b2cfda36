"""`bench/exchanges.py`: one conversation driven through the stores on moto behind the counting proxy; every write
is modelled, and a reply costs the same write units at its first exchange as later."""

from __future__ import annotations

from bench.exchanges import run


async def test_a_reply_costs_the_same_write_units_late_in_a_conversation_as_at_its_first_exchange() -> None:
    figures = await run([1, 12])

    replies = figures["replies"]
    assert replies[1]["total"] == replies[12]["total"] > 0
    assert abs(replies[1]["item_bytes"] - replies[12]["item_bytes"]) <= 2
    assert figures["unmodelled"] == {}
