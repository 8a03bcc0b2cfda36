"""What libraries log (aiohttp, asyncio, botocore, OpenTelemetry: Python's standard `logging`) reaches the log store
as the service's own lines do: one JSON object per line, phone numbers masked, bounded in size.

Found from outside: a `tracestate` header of 5000 characters made OpenTelemetry warn with the whole header as
plain text, and a handler error's traceback came out as a dozen plain lines, a recipient's number in clear.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog

from service.logging import FOREIGN_MESSAGE_MAX_CHARS, configure_logging
from tests.conftest import initiate_body
from tests.span_capture import spans_in_memory
from tests.support import api_client

HEADER_OF_5000 = "a=" + "x" * 5000


@pytest.fixture
def service_logging(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The service's logging configured as `comms serve` does, on a root logger with no handler (as in a fresh
    process, not pytest's); the root logger as it was again afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers[:] = []
    configure_logging("INFO")
    structlog.configure(cache_logger_on_first_use=False)  # the modules' loggers must not keep this set-up
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines_of(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Every line written, each parsed as JSON (a line that is not JSON fails the test here)."""
    return [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line]


def test_a_library_warning_is_one_json_line_naming_its_logger_and_level(service_logging, capsys):
    logging.getLogger("some.library").warning("pool of %d is full", 10)

    [line] = lines_of(capsys)
    assert line["event"] == "pool of 10 is full"
    assert line["logger"] == "some.library"
    assert line["level"] == "warning"
    assert line["timestamp"].endswith("Z")


def test_a_phone_number_in_a_library_message_is_masked(service_logging, capsys):
    logging.getLogger("some.library").warning("POST to %s failed", "whatsapp:+447700900123")

    [line] = lines_of(capsys)
    assert "447700900123" not in line["event"]
    assert "+44" in line["event"]


def test_a_library_exception_is_one_json_line_carrying_its_traceback(service_logging, capsys):
    try:
        raise ZeroDivisionError("for +447700900123")
    except ZeroDivisionError:
        logging.getLogger("aiohttp.server").exception("Error handling request")

    [line] = lines_of(capsys)
    assert line["event"] == "Error handling request"
    assert line["level"] == "error"
    assert "ZeroDivisionError" in line["exception"]
    assert "447700900123" not in line["exception"]


def test_a_huge_library_message_is_cut_to_a_bound_that_says_so(service_logging, capsys):
    logging.getLogger("some.library").warning("value %s", "y" * 50_000)

    [line] = lines_of(capsys)
    assert len(line["event"]) <= FOREIGN_MESSAGE_MAX_CHARS + 40
    assert line["event"].endswith("(50006 characters, cut)")


def test_the_services_own_lines_are_unchanged(service_logging, capsys):
    structlog.get_logger("service.x").info("evt", recipient_tel="+447700900123")

    [line] = lines_of(capsys)
    assert line["event"] == "evt"
    assert line["recipient_tel"] == "+44*******123"


def test_lines_below_the_configured_level_are_dropped(service_logging, capsys):
    logging.getLogger("some.library").debug("noise")

    assert lines_of(capsys) == []


async def test_a_callers_malformed_tracestate_leaves_only_bounded_json_lines(service_logging, capsys, settings, tenant):
    headers = {
        "x-api-key": tenant.api_key,
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": HEADER_OF_5000,
    }
    with spans_in_memory():
        async with api_client(settings) as (client, _):
            response = await client.post("/initiate-conversation", json=initiate_body("sms"), headers=headers)
            assert response.status == 200

    lines = lines_of(capsys)
    assert lines
    assert all("x" * 1000 not in orjson.dumps(line).decode() for line in lines)


def test_a_value_that_is_not_utf8_is_written_with_a_stand_in_and_never_fails_the_caller(service_logging, capsys):
    structlog.get_logger("service.api").info("http_request", trace_id="ab\udcffcd")
    logging.getLogger("aiohttp.server").warning("header %s", "\udc80")

    service_line, library_line = lines_of(capsys)
    assert service_line["trace_id"] == "ab?cd"
    assert library_line["event"] == "header ?"
