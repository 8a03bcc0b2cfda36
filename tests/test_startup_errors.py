"""What stops start-up is said in one line naming the cause (`comms: ...`, exit 2), never a traceback: found from
outside, a port in use ended in `OSError [Errno 98]`'s traceback and exit 1."""

from __future__ import annotations

import socket

import pytest

from local_stack.moto_server import free_port
from service.cli import main
from service.config import ConfigurationError, Settings
from service.runner import run_service


async def test_a_port_in_use_stops_start_up_naming_the_address(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = settings.model_copy(
            update={"host": "127.0.0.1", "port": port, "metrics_port": free_port(), "webhooks_enabled": False}
        )
        with pytest.raises(ConfigurationError, match=f"cannot listen on http://127.0.0.1:{port}"):
            await run_service(api, "api")


def test_comms_serve_on_a_port_in_use_exits_2_with_one_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for name, value in {
            "COMMS_HOST": "127.0.0.1",
            "COMMS_PORT": str(taken.getsockname()[1]),
            "COMMS_METRICS_PORT": str(free_port()),
            "COMMS_WEBHOOKS_ENABLED": "false",
            "COMMS_AWS_ENDPOINT_URL": str(settings.aws_endpoint_url),
            "COMMS_EVENT_LOOP": "asyncio",
        }.items():
            monkeypatch.setenv(name, value)
        # The process-wide logging set-up is not what is tested (and must not outlive the test).
        monkeypatch.setattr("service.cli.configure_logging", lambda *_, **__: None)
        assert main(["serve", "--role", "api"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("comms: cannot listen on")
    assert "Traceback" not in error


def test_comms_bootstrap_with_aws_unreachable_exits_3_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        monkeypatch.setenv("COMMS_AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("COMMS_AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setattr("service.cli.configure_logging", lambda *_, **__: None)
        assert main(["bootstrap"]) == 3
    error = capsys.readouterr().err
    assert error.startswith("comms: bootstrap: AWS unreachable")
    assert "Traceback" not in error


async def test_a_worker_whose_queue_url_names_no_queue_stops_start_up_naming_it(settings: Settings) -> None:
    missing = f"{settings.queue_url('whatsapp')}-missing"
    worker = settings.model_copy(
        update={
            "host": "127.0.0.1",
            "port": free_port(),
            "metrics_port": free_port(),
            "whatsapp_queue_url": missing,
            "consumer_queues": "whatsapp",
        }
    )
    with pytest.raises(ConfigurationError, match=f"the whatsapp queue does not exist: {missing}"):
        await run_service(worker, "worker")
