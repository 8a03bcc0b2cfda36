"""Command-line modes and options of `python -m bench` (`make bench ARGS="<mode> <options>"`).

python -m bench [template] [options]   the template sender (worker role); the default mode
python -m bench growth [options]       the template sender at C and at 4C with 4L (same C/L), compared
python -m bench endpoint [options]     POST /initiate-conversation, open loop at a fixed rate (api role)
python -m bench replies [options]      signed inbound webhooks answered by the reply consumer (api + worker)
python -m bench fairness [options]     a quiet tenant's dwell behind a noisy one, its cap on and off (worker)
python -m bench exchanges [--at N ...] DynamoDB write units of one conversation's template and of its Nth reply
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEADY_SECONDS = 60  # default N gives about this long at the ideal rate, plus the ramp and the drain
MODES = ("template", "growth", "endpoint", "replies", "fairness", "exchanges")


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """The template mode (and each run of the growth mode)."""

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
    tracing: bool = False
    tracing_both: bool = False  # run without tracing, then with it, and compare

    @property
    def ideal_per_s(self) -> float:
        return self.concurrency / self.ai_latency_s

    @property
    def mode(self) -> str:
        return "template"


@dataclass(frozen=True, slots=True)
class GrowthOptions:
    base: BenchOptions  # C, L, N of the first run
    grown: BenchOptions  # factor x C, factor x L (same C/L), its own N
    factor: int
    output: Path

    @property
    def mode(self) -> str:
        return "growth"


@dataclass(frozen=True, slots=True)
class EndpointOptions:
    rate_per_s: float
    requests: int
    warmup: int
    ceiling_s: float
    log_level: str
    output: Path
    tracing: bool
    sample_interval_s: float = 0.1

    @property
    def duration_s(self) -> float:
        return self.requests / self.rate_per_s

    @property
    def mode(self) -> str:
        return "endpoint"


@dataclass(frozen=True, slots=True)
class RepliesOptions:
    conversations: int  # each gets its template first, then `fragments` inbound messages
    fragments: int
    rate_per_s: float | None  # webhook posts per second (open loop); None: from the AWS endpoint ceiling
    window_s: int  # COMMS_BATCHING_WINDOW_S
    concurrency: int
    ai_latency_s: float  # of a reply's model call (the templates go through with no model latency)
    warmup: int
    ceiling_s: float
    log_level: str
    output: Path
    tracing: bool
    sample_interval_s: float = 0.1

    @property
    def mode(self) -> str:
        return "replies"


@dataclass(frozen=True, slots=True)
class FairnessOptions:
    concurrency: int
    ai_latency_s: float
    noisy: int  # conversations the noisy tenant queues at once, in each noisy phase
    quiet_rate_per_s: float  # the quiet tenant's trickle
    phase_s: float  # how long the trickle runs in each phase
    cap: int  # the noisy project's concurrent_conversations in the "cap on" phase
    defer_s: int  # COMMS_CONCURRENCY_DEFER_S
    log_level: str
    output: Path

    @property
    def quiet_per_phase(self) -> int:
        return max(1, round(self.phase_s * self.quiet_rate_per_s))

    @property
    def mode(self) -> str:
        return "fairness"


@dataclass(frozen=True, slots=True)
class ExchangesOptions:
    at: tuple[int, ...]  # the exchanges whose reply is reported (1 and 200 by default)
    output: Path

    @property
    def mode(self) -> str:
        return "exchanges"


Options = BenchOptions | GrowthOptions | EndpointOptions | RepliesOptions | FairnessOptions | ExchangesOptions


def default_conversations(concurrency: int, ai_latency_s: float) -> int:
    """Ramp and drain (2C) plus about a minute at the ideal rate, and never fewer than four rounds of C."""
    return 2 * concurrency + max(round(STEADY_SECONDS * concurrency / ai_latency_s), 4 * concurrency)


def _common(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("--log-level", default="INFO", help="the service's COMMS_LOG_LEVEL (INFO, as deployed)")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="length of the endpoint ceiling burst (3)")
    p.add_argument(
        "--output", type=Path, default=RESULTS_DIR / f"{mode}.json", help=f"JSON result (bench/results/{mode}.json)"
    )


def _template_arguments(p: argparse.ArgumentParser, *, growth: bool = False) -> None:
    p.add_argument("--concurrency", "-c", type=int, default=200, help="consumer slots C (default 200)")
    p.add_argument("--ai-latency", "-l", type=float, default=10.0, help="seconds per model call L (default 10)")
    p.add_argument(
        "--thread-latency", type=float, default=0.0, help="seconds per OpenAI conversation create (default 0)"
    )
    p.add_argument(
        "--conversations",
        "-n",
        type=int,
        default=None,
        help=f"N (default 2C + max({STEADY_SECONDS} s at C/L, 4C))" + ("; of the first run" if growth else ""),
    )
    p.add_argument("--warmup", type=int, default=10, help="conversations run before the idle RSS reading (10)")
    p.add_argument("--sample-interval", type=float, default=0.1, help="seconds between samples (0.1)")
    p.add_argument(
        "--feed",
        choices=["steady", "upfront"],
        default="steady",
        help="steady: keep C + margin messages queued or in flight (default); upfront: all N queued at once",
    )
    p.add_argument("--ahead", type=int, default=None, help="steady feed: queued + in flight (default C + max(50, C/2))")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of one service process on the embedded stack (moto through a counting proxy, "
        "provider sandboxes), figures printed beside the targets of issue 13 / SPEC §8. The mode defaults to "
        "template.",
    )
    modes = p.add_subparsers(dest="mode", metavar="{" + ",".join(MODES) + "}")

    template = modes.add_parser(
        "template",
        help="template sender (worker role): throughput vs C/L, CPU, RSS, AWS requests per conversation",
    )
    _template_arguments(template)
    template.add_argument(
        "--tracing",
        nargs="?",
        const="on",
        choices=["on", "both"],
        default=None,
        help="on: the service exports OTLP to an in-bench collector; both: a run without, then one with tracing",
    )
    _common(template, "template")

    growth = modes.add_parser(
        "growth",
        help="template sender at C, L and at factor times C and L (same C/L, factor times in flight), compared",
    )
    _template_arguments(growth, growth=True)
    growth.add_argument("--factor", type=int, default=4, help="in-flight growth (4: C=800, L=40 s from 200, 10 s)")
    growth.add_argument(
        "--grown-conversations", type=int, default=None, help="N of the second run (default: as for its C and L)"
    )
    _common(growth, "growth")

    endpoint = modes.add_parser(
        "endpoint", help="POST /initiate-conversation, open loop at a fixed rate (api role): latency, CPU, AWS"
    )
    endpoint.add_argument("--rate", type=float, default=25.0, help="requests per second, open loop (25)")
    endpoint.add_argument("--duration", type=float, default=60.0, help="seconds of load (60), unless -n is given")
    endpoint.add_argument("--requests", "-n", type=int, default=None, help="requests in all (default rate x duration)")
    endpoint.add_argument("--warmup", type=int, default=50, help="requests before the measurement, same rate (50)")
    endpoint.add_argument("--tracing", action="store_true", help="the service exports OTLP to an in-bench collector")
    _common(endpoint, "endpoint")

    replies = modes.add_parser(
        "replies", help="signed inbound webhooks answered by the reply consumer (api + worker processes)"
    )
    replies.add_argument("--conversations", "-n", type=int, default=300, help="conversations answered (300)")
    replies.add_argument("--fragments", type=int, default=1, help="inbound messages per conversation (1)")
    replies.add_argument(
        "--rate",
        type=float,
        default=None,
        help="webhook posts per second, open loop (default: the AWS endpoint ceiling / 40, between 1 and 10)",
    )
    replies.add_argument("--window", type=int, default=2, help="COMMS_BATCHING_WINDOW_S, seconds (2)")
    replies.add_argument("--concurrency", "-c", type=int, default=64, help="consumer slots of the worker (64)")
    replies.add_argument("--ai-latency", "-l", type=float, default=1.0, help="seconds per reply model call (1)")
    replies.add_argument("--warmup", type=int, default=10, help="conversations answered before the measurement")
    replies.add_argument("--tracing", action="store_true", help="both processes export OTLP to an in-bench collector")
    _common(replies, "replies")

    fairness = modes.add_parser(
        "fairness", help="a quiet tenant's dwell (enqueue to send) behind a noisy tenant's backlog, cap on and off"
    )
    fairness.add_argument("--concurrency", "-c", type=int, default=20, help="consumer slots of the worker (20)")
    fairness.add_argument("--ai-latency", "-l", type=float, default=1.0, help="seconds per model call L (1)")
    fairness.add_argument("--noisy", type=int, default=300, help="conversations the noisy tenant queues (300)")
    fairness.add_argument("--quiet-rate", type=float, default=2.0, help="the quiet tenant's conversations/s (2)")
    fairness.add_argument("--phase-seconds", type=float, default=15.0, help="trickle length of each phase (15)")
    fairness.add_argument("--cap", type=int, default=None, help="the noisy concurrent_conversations (default C/4)")
    fairness.add_argument("--defer", type=int, default=5, help="COMMS_CONCURRENCY_DEFER_S (5)")
    _common(fairness, "fairness")
    exchanges = modes.add_parser(
        "exchanges", help="DynamoDB write units of one conversation's template and of its reply at exchange N"
    )
    exchanges.add_argument("--at", type=int, nargs="+", default=[1, 200], help="exchanges to report (1 200)")
    _common(exchanges, "exchanges")
    return p


def _with_mode(argv: Sequence[str]) -> list[str]:
    """`python -m bench -c 50` (no mode) is the template mode, as before the modes existed."""
    args = list(argv)
    if not args or (args[0] not in MODES and args[0] not in ("-h", "--help")):
        return ["template", *args]
    return args


def _template(
    args: argparse.Namespace,
    p: argparse.ArgumentParser,
    concurrency: int,
    latency: float,
    conversations: int | None,
    output: Path,
    tracing: bool,
) -> BenchOptions:
    if concurrency < 1 or latency <= 0:
        p.error("--concurrency must be >= 1 and --ai-latency > 0")
    n = conversations or default_conversations(concurrency, latency)
    if n < 2 * min(concurrency, n // 4) + 10:
        p.error("--conversations is too small for a steady-state window")
    return BenchOptions(
        concurrency=concurrency,
        ai_latency_s=latency,
        thread_latency_s=args.thread_latency,
        conversations=n,
        warmup=args.warmup,
        sample_interval_s=args.sample_interval,
        ceiling_s=args.ceiling_seconds,
        log_level=args.log_level.upper(),
        output=output,
        feed=args.feed,
        ahead=args.ahead or concurrency + max(50, concurrency // 2),
        tracing=tracing,
    )


def parse_options(argv: Sequence[str] | None = None) -> Options:
    p = parser()
    args = p.parse_args(_with_mode(sys.argv[1:] if argv is None else argv))
    if args.mode == "template":
        options = _template(
            args, p, args.concurrency, args.ai_latency, args.conversations, args.output, args.tracing == "on"
        )
        if args.tracing == "both":
            return replace(options, tracing_both=True)
        return options
    if args.mode == "growth":
        if args.factor < 2:
            p.error("--factor must be at least 2")
        stem = args.output.with_suffix("")
        base = _template(
            args,
            p,
            args.concurrency,
            args.ai_latency,
            args.conversations,
            stem.with_name(stem.name + "-base.json"),
            False,
        )
        grown = _template(
            args,
            p,
            args.concurrency * args.factor,
            args.ai_latency * args.factor,
            args.grown_conversations,
            stem.with_name(stem.name + "-grown.json"),
            False,
        )
        if args.ahead:
            grown = replace(grown, ahead=args.ahead * args.factor)
        return GrowthOptions(base, grown, args.factor, args.output)
    if args.mode == "endpoint":
        if args.rate <= 0:
            p.error("--rate must be > 0")
        requests = args.requests or max(1, round(args.rate * args.duration))
        return EndpointOptions(
            rate_per_s=args.rate,
            requests=requests,
            warmup=args.warmup,
            ceiling_s=args.ceiling_seconds,
            log_level=args.log_level.upper(),
            output=args.output,
            tracing=args.tracing,
        )
    if args.mode == "exchanges":
        if min(args.at) < 1:
            p.error("--at takes exchange numbers >= 1")
        return ExchangesOptions(at=tuple(sorted(set(args.at))), output=args.output)
    if args.mode == "fairness":
        cap = args.cap or max(1, args.concurrency // 4)
        if args.concurrency < 2 or args.ai_latency <= 0 or args.noisy < 1 or args.quiet_rate <= 0 or cap < 1:
            p.error("--concurrency must be >= 2, --ai-latency, --noisy, --quiet-rate and --cap > 0")
        return FairnessOptions(
            concurrency=args.concurrency,
            ai_latency_s=args.ai_latency,
            noisy=args.noisy,
            quiet_rate_per_s=args.quiet_rate,
            phase_s=args.phase_seconds,
            cap=cap,
            defer_s=args.defer,
            log_level=args.log_level.upper(),
            output=args.output,
        )
    if args.conversations < 1 or args.fragments < 1 or (args.rate is not None and args.rate <= 0):
        p.error("--conversations and --fragments must be >= 1 and --rate > 0")
    return RepliesOptions(
        conversations=args.conversations,
        fragments=args.fragments,
        rate_per_s=args.rate,
        window_s=args.window,
        concurrency=args.concurrency,
        ai_latency_s=args.ai_latency,
        warmup=args.warmup,
        ceiling_s=args.ceiling_seconds,
        log_level=args.log_level.upper(),
        output=args.output,
        tracing=args.tracing,
    )
