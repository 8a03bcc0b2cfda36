"""Command-line options of `python -m bench`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEADY_SECONDS = 60  # default N gives about this long at the ideal rate, plus the ramp and the drain


@dataclass(frozen=True, slots=True)
class BenchOptions:
    concurrency: int
    ai_latency_s: float
    thread_latency_s: float
    conversations: int
    warmup: int
    sample_interval_s: float
    ceiling_s: float
    log_level: str
    output: Path
    feed: str  # "steady" | "upfront"
    ahead: int  # steady feed: messages queued or in flight at most

    @property
    def ideal_per_s(self) -> float:
        return self.concurrency / self.ai_latency_s


def default_conversations(concurrency: int, ai_latency_s: float) -> int:
    """Ramp and drain (2C) plus about a minute at the ideal rate, and never fewer than four rounds of C."""
    return 2 * concurrency + max(round(STEADY_SECONDS * concurrency / ai_latency_s), 4 * concurrency)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Consumer benchmark: one service process (worker role) on the embedded stack; throughput vs "
        "C/L, CPU ms, RSS and AWS requests per conversation, and the local AWS endpoint's ceiling (SPEC §8).",
    )
    p.add_argument("--concurrency", "-c", type=int, default=200, help="consumer slots C (default 200)")
    p.add_argument("--ai-latency", "-l", type=float, default=10.0, help="seconds per model call L (default 10)")
    p.add_argument(
        "--thread-latency", type=float, default=0.0, help="seconds per OpenAI conversation create (default 0)"
    )
    p.add_argument(
        "--conversations", "-n", type=int, default=None, help=f"N (default 2C + max({STEADY_SECONDS} s at C/L, 4C))"
    )
    p.add_argument("--warmup", type=int, default=10, help="conversations run before the idle RSS reading (10)")
    p.add_argument("--sample-interval", type=float, default=0.1, help="seconds between samples (0.1)")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="length of the endpoint ceiling burst (3)")
    p.add_argument("--log-level", default="INFO", help="the service's COMMS_LOG_LEVEL (INFO, as deployed)")
    p.add_argument(
        "--feed",
        choices=["steady", "upfront"],
        default="steady",
        help="steady: keep C + margin messages queued or in flight (default); upfront: all N queued at once",
    )
    p.add_argument("--ahead", type=int, default=None, help="steady feed: queued + in flight (default C + max(50, C/2))")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="JSON result file")
    return p


def parse_options(argv: Sequence[str] | None = None) -> BenchOptions:
    args = parser().parse_args(argv)
    if args.concurrency < 1 or args.ai_latency <= 0:
        parser().error("--concurrency must be >= 1 and --ai-latency > 0")
    conversations = args.conversations or default_conversations(args.concurrency, args.ai_latency)
    if conversations < 2 * min(args.concurrency, conversations // 4) + 10:
        parser().error("--conversations is too small for a steady-state window")
    return BenchOptions(
        concurrency=args.concurrency,
        ai_latency_s=args.ai_latency,
        thread_latency_s=args.thread_latency,
        conversations=conversations,
        warmup=args.warmup,
        sample_interval_s=args.sample_interval,
        ceiling_s=args.ceiling_seconds,
        log_level=args.log_level.upper(),
        output=args.output,
        feed=args.feed,
        ahead=args.ahead or args.concurrency + max(50, args.concurrency // 2),
    )
