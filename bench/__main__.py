"""`python -m bench`: run the consumer benchmark once, print the table, write the JSON result."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from bench.options import BenchOptions, parse_options
from bench.report import as_json, derived, render, rows, write_json
from bench.run import BenchRun, run_bench


async def run_stoppable(options: BenchOptions) -> BenchRun:
    """SIGTERM cancels the run like Ctrl-C does, so the service, moto and the sandboxes are stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_bench(options)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    run = asyncio.run(run_stoppable(options))
    figures = derived(run)
    print(render(rows(run, figures)))
    write_json(options.output, as_json(run, figures))
    print(f"\nJSON: {options.output}")
    if not run.verification.passed:
        print("CORRECTNESS FAILED: " + "; ".join(run.verification.problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
