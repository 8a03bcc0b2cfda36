"""`python -m bench [mode] [options]` (bench/options.py): every mode is reachable, and no mode means the template
mode, so `make bench` and `make bench ARGS="-c 50"` keep their meaning."""

from __future__ import annotations

from pathlib import Path

from bench.options import (
    BenchOptions,
    EndpointOptions,
    ExchangesOptions,
    GrowthOptions,
    RepliesOptions,
    parse_options,
)


def test_no_mode_is_the_template_mode_with_the_spec_setting() -> None:
    options = parse_options([])
    assert isinstance(options, BenchOptions)
    assert (options.concurrency, options.ai_latency_s, options.tracing) == (200, 10.0, False)


def test_options_without_a_mode_are_the_template_modes() -> None:
    options = parse_options(["-c", "50", "-l", "1", "-n", "300"])
    assert isinstance(options, BenchOptions)
    assert (options.concurrency, options.ai_latency_s, options.conversations) == (50, 1.0, 300)


def test_template_tracing_on_or_off_then_on() -> None:
    on = parse_options(["template", "--tracing"])
    both = parse_options(["template", "--tracing", "both"])
    assert isinstance(on, BenchOptions) and isinstance(both, BenchOptions)
    assert (on.tracing, on.tracing_both) == (True, False)
    assert both.tracing_both


def test_growth_keeps_c_over_l_and_multiplies_what_is_in_flight() -> None:
    options = parse_options(["growth"])
    assert isinstance(options, GrowthOptions)
    assert (options.base.concurrency, options.base.ai_latency_s) == (200, 10.0)
    assert (options.grown.concurrency, options.grown.ai_latency_s) == (800, 40.0)
    assert options.base.ideal_per_s == options.grown.ideal_per_s


def test_endpoint_runs_rate_times_duration_requests_unless_told_how_many() -> None:
    by_duration = parse_options(["endpoint", "--rate", "50", "--duration", "2"])
    counted = parse_options(["endpoint", "-n", "30"])
    assert isinstance(by_duration, EndpointOptions) and isinstance(counted, EndpointOptions)
    assert (by_duration.rate_per_s, by_duration.requests) == (50.0, 100)
    assert (counted.rate_per_s, counted.requests) == (25.0, 30)


def test_replies_options_and_each_mode_writes_its_own_json() -> None:
    options = parse_options(["replies", "-n", "20", "--fragments", "3", "--tracing"])
    assert isinstance(options, RepliesOptions)
    assert (options.conversations, options.fragments, options.tracing) == (20, 3, True)
    assert options.output.name == "replies.json"
    assert Path(parse_options(["endpoint"]).output).name == "endpoint.json"


def test_the_exchanges_mode_reports_each_named_exchange_once_in_order() -> None:
    options = parse_options(["exchanges", "--at", "200", "1", "1"])
    assert isinstance(options, ExchangesOptions)
    assert options.at == (1, 200)
