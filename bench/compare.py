"""Two template runs side by side: the growth row (C, L then factor x C, factor x L) and tracing off vs on."""

from __future__ import annotations

from typing import Any

from bench.report import TARGET_RATIO, TARGET_RSS_PER_IN_FLIGHT_KB, as_json, derived
from bench.run import BenchRun
from bench.table import Row, check

TARGET_GROWTH_CPU = 1.2  # CPU per conversation at factor x in flight, at most this times the base figure


def _setting(run: BenchRun) -> str:
    o = run.options
    return f"C={o.concurrency}, L={o.ai_latency_s:g} s, N={o.conversations}"


def growth_comparison(base: BenchRun, grown: BenchRun, factor: int) -> tuple[list[Row], dict[str, Any]]:
    """The growth row of issue 13: same C/L, factor x in flight; ratio, CPU growth and RSS per in-flight."""
    fb, fg = derived(base), derived(grown)
    cpu_b, cpu_g = base.steady.cpu_ms_per_conversation, grown.steady.cpu_ms_per_conversation
    cpu_growth = cpu_g / max(cpu_b, 1e-9)
    aws_b, aws_g = base.steady.aws_requests_per_conversation, grown.steady.aws_requests_per_conversation
    wu_b, wu_g = base.steady.write_units.get("total", 0.0), grown.steady.write_units.get("total", 0.0)
    met = {
        "base ratio_of_ideal>=0.95": fb["ratio_of_ideal"] >= TARGET_RATIO,
        "grown ratio_of_ideal>=0.95": fg["ratio_of_ideal"] >= TARGET_RATIO,
        "cpu growth<=1.2": cpu_growth <= TARGET_GROWTH_CPU,
        "grown rss_per_in_flight_kb<=100": fg["rss_per_in_flight_kb"] <= TARGET_RSS_PER_IN_FLIGHT_KB,
    }
    table = [
        Row("Growth", f"{_setting(base)}  ->  {_setting(grown)} ({factor}x in flight, same C/L)"),
        Row(
            "Ratio of ideal",
            f"{fb['ratio_of_ideal']:.3f} -> {fg['ratio_of_ideal']:.3f}",
            ">= 0.95 (both)",
            check(met["base ratio_of_ideal>=0.95"] and met["grown ratio_of_ideal>=0.95"]),
        ),
        Row(
            "CPU per conversation",
            f"{cpu_b:.2f} -> {cpu_g:.2f} ms (x{cpu_growth:.2f})",
            f"<= {TARGET_GROWTH_CPU:g}x",
            check(met["cpu growth<=1.2"]),
        ),
        Row(
            "RSS per in-flight conversation",
            f"{fb['rss_per_in_flight_kb']:.1f} -> {fg['rss_per_in_flight_kb']:.1f} KB",
            "<= 100 KB",
            check(met["grown rss_per_in_flight_kb<=100"]),
        ),
        Row("AWS requests per conversation", f"{aws_b:.2f} -> {aws_g:.2f}"),
        Row("DynamoDB write units per conversation", f"{wu_b:.2f} -> {wu_g:.2f}"),
        Row(
            "Correctness",
            f"{'ok' if base.verification.passed else 'FAIL'} / {'ok' if grown.verification.passed else 'FAIL'}",
            "all sent once",
            "ok" if base.verification.passed and grown.verification.passed else "FAIL",
        ),
    ]
    data = {
        "mode": "growth",
        "factor": factor,
        "cpu_growth": cpu_growth,
        "targets_met": met,
        "base": as_json(base, fb),
        "grown": as_json(grown, fg),
    }
    return table, data


def tracing_comparison(off: BenchRun, on: BenchRun) -> tuple[list[Row], dict[str, Any]]:
    """CPU per conversation with tracing off (the target) and on (reported), back to back."""
    cpu_off, cpu_on = off.steady.cpu_ms_per_conversation, on.steady.cpu_ms_per_conversation
    counts = on.tracing
    exported = (
        f"{counts.requests} OTLP requests, {counts.spans} spans, {counts.bytes / 1024:.0f} KB"
        if counts is not None
        else "no collector"
    )
    table = [
        Row("Tracing", f"{_setting(off)}: off, then on"),
        Row(
            "CPU per conversation",
            f"{cpu_off:.2f} ms off, {cpu_on:.2f} ms on (+{cpu_on - cpu_off:.2f} ms)",
            "<= 5 ms (off)",
            check(cpu_off <= 5.0),
        ),
        Row("Ratio of ideal", f"{derived(off)['ratio_of_ideal']:.3f} off, {derived(on)['ratio_of_ideal']:.3f} on"),
        Row("Exported (on)", exported),
    ]
    data = {
        "mode": "template-tracing",
        "cpu_ms_per_conversation": {"off": cpu_off, "on": cpu_on},
        "off": as_json(off, derived(off)),
        "on": as_json(on, derived(on)),
    }
    return table, data
