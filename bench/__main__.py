"""`python -m bench [mode] [options]`: run one mode, print its table, write its JSON (bench/README.md)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from bench import endpoint as endpoint_mode
from bench import exchanges as exchanges_mode
from bench import fairness as fairness_mode
from bench import replies as replies_mode
from bench import report as template_report
from bench.compare import growth_comparison, tracing_comparison
from bench.options import (
    BenchOptions,
    EndpointOptions,
    ExchangesOptions,
    FairnessOptions,
    GrowthOptions,
    Options,
    RepliesOptions,
    parse_options,
)
from bench.run import run_bench
from bench.table import render, write_json

T = TypeVar("T")


async def stoppable(run: Callable[[], Awaitable[T]]) -> T:
    """SIGTERM cancels the run like Ctrl-C does, so the service, moto and the sandboxes are stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run()


def finish(output: Path, data: dict[str, Any], problems: list[str]) -> int:
    """Write the JSON; exit code 1 only for a correctness failure (a missed target is reported, not fatal)."""
    write_json(output, data)
    print(f"\nJSON: {output}")
    if problems:
        print("CORRECTNESS FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def template(options: BenchOptions) -> int:
    if options.tracing_both:
        off = asyncio.run(stoppable(lambda: run_bench(replace(options, tracing=False, tracing_both=False))))
        on_options = replace(options, tracing=True, tracing_both=False)
        on = asyncio.run(stoppable(lambda: run_bench(on_options)))
        for run in (off, on):
            print(render(template_report.rows(run, template_report.derived(run))) + "\n")
        table, data = tracing_comparison(off, on)
        print(render(table))
        problems = off.verification.problems + on.verification.problems
        return finish(options.output, data, problems)
    run = asyncio.run(stoppable(lambda: run_bench(options)))
    figures = template_report.derived(run)
    print(render(template_report.rows(run, figures)))
    return finish(options.output, template_report.as_json(run, figures), run.verification.problems)


def growth(options: GrowthOptions) -> int:
    base = asyncio.run(stoppable(lambda: run_bench(options.base)))
    print(render(template_report.rows(base, template_report.derived(base))) + "\n")
    grown = asyncio.run(stoppable(lambda: run_bench(options.grown)))
    print(render(template_report.rows(grown, template_report.derived(grown))) + "\n")
    table, data = growth_comparison(base, grown, options.factor)
    print(render(table))
    return finish(options.output, data, base.verification.problems + grown.verification.problems)


def endpoint(options: EndpointOptions) -> int:
    run = asyncio.run(stoppable(lambda: endpoint_mode.run_endpoint(options)))
    print(render(endpoint_mode.rows(run)))
    return finish(options.output, endpoint_mode.as_json(run), run.problems)


def replies(options: RepliesOptions) -> int:
    run = asyncio.run(stoppable(lambda: replies_mode.run_replies(options)))
    print(render(replies_mode.rows(run)))
    return finish(options.output, replies_mode.as_json(run), run.problems)


def fairness(options: FairnessOptions) -> int:
    run = asyncio.run(stoppable(lambda: fairness_mode.run_fairness(options)))
    print(render(fairness_mode.rows(run)))
    return finish(options.output, fairness_mode.as_json(run), run.problems)


def exchanges(options: ExchangesOptions) -> int:
    return finish(options.output, asyncio.run(exchanges_mode.run(options.at)), [])


def main(argv: Sequence[str] | None = None) -> int:
    options: Options = parse_options(argv)
    if isinstance(options, GrowthOptions):
        return growth(options)
    if isinstance(options, EndpointOptions):
        return endpoint(options)
    if isinstance(options, RepliesOptions):
        return replies(options)
    if isinstance(options, FairnessOptions):
        return fairness(options)
    if isinstance(options, ExchangesOptions):
        return exchanges(options)
    return template(options)


if __name__ == "__main__":
    raise SystemExit(main())
