"""The template mode's figures next to their targets (issue 13, SPEC §8 round two), as a table and as JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from bench.run import BenchRun
from bench.table import Row, check, tracing_rows, write_unit_rows

TARGET_RATIO = 0.95  # of the ideal C/L
TARGET_RSS_PER_IN_FLIGHT_KB = 100.0
TARGET_AWS = 3.6  # requests per conversation
TARGET_CPU_MS = 5.0


def derived(run: BenchRun) -> dict[str, Any]:
    """Ratios and ceilings computed from the measured figures."""
    steady = run.steady
    ideal = run.options.ideal_per_s
    per_conversation = steady.aws_requests_per_conversation
    direct, proxied = run.ceilings[0].requests_per_s, run.ceilings[-1].requests_per_s
    limits = {
        "concurrency C/L": ideal,
        "AWS endpoint ceiling / requests per conversation": min(direct, proxied) / max(per_conversation, 1e-9),
        "moto CPU 1000 / moto ms per conversation": 1000 / max(steady.moto_cpu_ms_per_conversation, 1e-9),
        "service CPU 1000 / CPU ms": 1000 / max(steady.cpu_ms_per_conversation, 1e-9),
    }
    rss_per_in_flight = (run.peak_rss_kb - run.idle.rss_kb) / run.options.concurrency
    return {
        "ideal_per_s": ideal,
        "ratio_of_ideal": steady.conversations_per_s / ideal,
        "rss_per_in_flight_kb": rss_per_in_flight,
        "limits_per_s": limits,
        "binding_limit": min(limits, key=lambda name: limits[name]),
        "targets_met": {
            "ratio_of_ideal>=0.95": steady.conversations_per_s / ideal >= TARGET_RATIO,
            "rss_per_in_flight_kb<=100": rss_per_in_flight <= TARGET_RSS_PER_IN_FLIGHT_KB,
            "aws_requests_per_conversation<=3.6": per_conversation <= TARGET_AWS,
            "cpu_ms_per_conversation<=5": steady.cpu_ms_per_conversation <= TARGET_CPU_MS,
        },
    }


def rows(run: BenchRun, figures: dict[str, Any]) -> list[Row]:
    o, s = run.options, run.steady
    direct, proxied = run.ceilings[0], run.ceilings[-1]
    limits = figures["limits_per_s"]
    met = figures["targets_met"]
    return [
        Row(
            "Setting",
            f"template: C={o.concurrency}, L={o.ai_latency_s:g} s, N={o.conversations}, warm-up {o.warmup}, "
            f"feed {o.feed}"
            + (f" (ahead {o.ahead})" if o.feed == "steady" else "")
            + (", tracing ON" if o.tracing else ", tracing off"),
        ),
        Row("Ideal C/L", f"{figures['ideal_per_s']:.1f} conv/s"),
        Row("Achieved (steady state)", f"{s.conversations_per_s:.1f} conv/s ({s.conversations} in {s.seconds:.1f} s)"),
        Row("  ratio of ideal", f"{figures['ratio_of_ideal']:.3f}", ">= 0.95", check(met["ratio_of_ideal>=0.95"])),
        Row(
            "  AI calls in flight (mean)",
            f"{s.ai_in_flight_mean:.0f} of C={o.concurrency} ({s.ai_in_flight_mean / o.concurrency:.2f}: the ratio "
            "by Little's law)",
        ),
        Row("  consumer step means", ", ".join(f"{k} {v:.0f} ms" for k, v in run.step_ms.items())),
        Row(
            "CPU per conversation",
            f"{s.cpu_ms_per_conversation:.2f} ms"
            + (" (tracing on: the target is for tracing off)" if o.tracing else ""),
            "<= 5 ms",
            check(met["cpu_ms_per_conversation<=5"]),
        ),
        Row(
            "  service CPU share",
            f"{s.service_cpu_share:.0%} of a core; idle {run.idle_cpu_share:.1%} "
            f"(= {run.idle_cpu_share * 1000 / max(s.conversations_per_s, 1e-9):.1f} ms per conversation at this rate)",
        ),
        Row("Peak RSS (load)", f"{run.peak_rss_kb / 1024:.1f} MB (idle after warm-up {run.idle.rss_kb / 1024:.1f} MB)"),
        Row(
            "RSS per in-flight conversation",
            f"{figures['rss_per_in_flight_kb']:.1f} KB",
            "<= 100 KB",
            check(met["rss_per_in_flight_kb<=100"]),
        ),
        Row("  RSS after the load", f"{run.after_load.rss_kb / 1024:.1f} MB"),
        Row(
            "AWS requests per conversation",
            f"{s.aws_requests_per_conversation:.2f}",
            "<= 3.6",
            check(met["aws_requests_per_conversation<=3.6"]),
        ),
        *[
            Row(f"  {op}", f"{n:.2f} /conv, {s.aws_upstream_ms.get(op, 0):.1f} ms")
            for op, n in s.aws_by_operation.items()
        ],
        *write_unit_rows(s.write_units, "conv", run.write_units_unmodelled, run.write_units_drift),
        *tracing_rows(run.tracing, "conversation", run.whole_load.conversations),
        Row("AWS endpoint ceiling", f"{direct.requests_per_s:.0f} req/s moto, {proxied.requests_per_s:.0f} via proxy"),
        Row(
            "  moto CPU per request",
            f"{s.moto_cpu_ms_per_request:.1f} ms for the service's mix, {direct.moto_cpu_ms_per_request:.1f} ms "
            "in the ceiling burst",
        ),
        Row("  moto CPU share", f"{s.moto_cpu_share:.0%} of a core"),
        Row(
            "Other CPU in the window",
            f"bench process {s.bench_cpu_share:.0%}, other processes {s.other_cpu_share:.0%}, "
            f"steal {s.steal_share:.0%} (of one core; {run.machine['cpus']} cores)",
        ),
        Row("Limit: C/L", f"{limits['concurrency C/L']:.1f} conv/s"),
        Row(
            "Limit: ceiling / AWS req per conv",
            f"{limits['AWS endpoint ceiling / requests per conversation']:.1f} conv/s",
        ),
        Row("Limit: 1000 / moto ms per conv", f"{limits['moto CPU 1000 / moto ms per conversation']:.1f} conv/s"),
        Row("Limit: 1000 / CPU ms", f"{limits['service CPU 1000 / CPU ms']:.1f} conv/s"),
        Row("Binding limit", figures["binding_limit"]),
        Row(
            "Messages finished (service)",
            ", ".join(f"{k} {v}" for k, v in run.finished_by_reason.items())
            + f"; lost by moto and re-queued {run.resent_lost}",
        ),
        Row(
            "Correctness",
            f"{run.verification.statuses} ; Twilio {run.verification.twilio_messages} messages, "
            f"{run.verification.twilio_distinct_recipients} recipients",
            f"all {run.verification.expected} sent once",
            "ok" if run.verification.passed else "FAIL",
        ),
    ]


def as_json(run: BenchRun, figures: dict[str, Any]) -> dict[str, Any]:
    data = asdict(run)
    data["verification"]["passed"] = run.verification.passed
    data["step_ms_note"] = "mean ms per consumer step over the load, from the service's /metrics"
    data["write_units_note"] = "DynamoDB write units per conversation (item size x copies; bench/write_units.py)"
    return {"mode": "template", **figures, **data}
