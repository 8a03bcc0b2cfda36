"""The table every mode prints (figure, measured, target, verdict) and the JSON file it writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.otlp_collector import CollectorCounts


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    value: str
    target: str = ""
    verdict: str = ""  # "ok" / "MISS" / ""


def check(ok: bool) -> str:
    return "ok" if ok else "MISS"


def write_unit_rows(
    per_unit: dict[str, float], unit: str, unmodelled: dict[str, int], drift: dict[str, int] | None = None
) -> list[Row]:
    """DynamoDB write units per unit of work (item size x copies written, GSIs included; bench/write_units.py),
    and how well the ledger's item images matched moto's items at the end (its self-check)."""
    if not per_unit:
        return []
    split = f"base tables {per_unit['base tables']:.2f} + GSIs {per_unit['GSIs']:.2f}"
    missing = f"; {sum(unmodelled.values())} writes not modelled: {unmodelled}" if unmodelled else ""
    rows = [Row("DynamoDB write units", f"{per_unit['total']:.2f} /{unit} ({split}){missing}", "reported")]
    named = {k: v for k, v in per_unit.items() if k not in ("total", "base tables", "GSIs")}
    rows += [Row(f"  {name}", f"{value:.2f} /{unit}") for name, value in named.items()]
    if drift is not None:
        off = drift["size_differs"] + drift["only_in_moto"] + drift["only_in_ledger"]
        rows.append(
            Row(
                "  ledger check",
                f"{drift['items'] - off}/{drift['items']} items as moto stores them" + (f" ({drift})" if off else ""),
            )
        )
    return rows


def tracing_rows(counts: CollectorCounts | None, unit: str, done: int) -> list[Row]:
    """What the in-bench OTLP collector received (tracing on), or a note that tracing was off."""
    if counts is None:
        return [Row("Tracing", "off (no OTEL_* variables reach the service)")]
    per = max(1, done)
    return [
        Row(
            "Tracing: OTLP export received",
            f"{counts.requests} requests, {counts.bytes / 1024:.0f} KB, {counts.spans} spans "
            f"({counts.spans / per:.1f} spans and {counts.bytes / per:.0f} bytes per {unit})"
            + (f"; {counts.undecodable} bodies not decoded" if counts.undecodable else "")
            + ("" if counts.requests else " - nothing exported: does the service read OTEL_*?"),
            "reported",
        )
    ]


def render(table: list[Row]) -> str:
    head = Row("Figure", "Measured", "Target", "")
    widths = [max(len(getattr(r, f)) for r in [head, *table]) for f in ("figure", "value", "target", "verdict")]
    lines = []
    for i, r in enumerate([head, *table]):
        cells = (r.figure, r.value, r.target, r.verdict)
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON; paths (the options' output file) are written as text, anything else not JSON is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_path_text) + "\n")


def _path_text(value: object) -> str:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
