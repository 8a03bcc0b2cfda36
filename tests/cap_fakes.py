"""An in-memory `concurrency_cap.InflightLeases` with the adapter's rules (a cap per key, expired leases pruned,
refresh re-adds, release forgets), and the `FakePort` failure injection of tests/fakes.py."""

from __future__ import annotations

from service.domain.concurrency_cap import InflightLeases
from tests.fakes import FakePort, port_call, store_failure


class FakeInflightLeases(FakePort):
    def __init__(self) -> None:
        super().__init__(store_failure("dynamodb"))
        self.leases: dict[str, dict[str, float]] = {}  # key -> holder -> expiry (epoch seconds)
        self.most_held: dict[str, int] = {}  # key -> the most leases ever held at once

    def held(self, key: str) -> int:
        return len(self.leases.get(key, {}))

    @port_call
    async def acquire(self, key: str, holder: str, cap: int, until: float, now: float) -> str | None:
        live = {h: at for h, at in self.leases.get(key, {}).items() if at > now}
        if len(live) >= cap:
            return None
        live[holder] = until
        self.leases[key] = live
        self.most_held[key] = max(self.most_held.get(key, 0), len(live))
        return key

    @port_call
    async def refresh(self, key: str, holder: str, until: float) -> None:
        if key in self.leases:
            self.leases[key][holder] = until

    @port_call
    async def release(self, key: str, holder: str) -> None:
        self.leases.get(key, {}).pop(holder, None)


def _implements_the_port(fake: FakeInflightLeases) -> InflightLeases:
    return fake  # mypy: the fake follows the port
