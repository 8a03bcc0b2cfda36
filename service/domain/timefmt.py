"""Timestamps as the records store them: ISO 8601 UTC with one `Z` designator, millisecond precision."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
