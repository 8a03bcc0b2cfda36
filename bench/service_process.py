"""The service under test: `python -m service serve --role <role>` in its own process, configured by env vars.

Only COMMS_* settings and, with `--tracing`, the standard OTEL_* variables reach it: any OTEL_* variable of the
shell running the benchmark is dropped, so a run without tracing really has tracing off.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from local_stack.moto_server import LOCAL_CREDENTIALS
from service.config import Settings


def service_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without COMMS_* and OTEL_* variables, plus every setting of `settings` as COMMS_*
    and `extra` (e.g. the OTEL_* variables of a traced run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMMS_", "OTEL_"))}
    env.update(LOCAL_CREDENTIALS)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"COMMS_{name.upper()}"] = str(value)
    env.update(extra or {})
    return env


class ServiceProcess:
    def __init__(
        self, settings: Settings, log_path: Path, role: str = "worker", extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.role = role
        self.extra_env = dict(extra_env or {})
        self.base_url = f"http://127.0.0.1:{settings.port}"
        self.metrics_url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stop_requested = False

    @property
    def pid(self) -> int:
        assert self._process is not None, "service not started"
        return self._process.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--role", self.role],
            env=service_environment(self.settings, self.extra_env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    async with session.get(f"{self.base_url}/readyz") as answer:
                        if answer.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"service not ready within {timeout_s:.0f} s; see {self.log_path}")

    async def metrics(self) -> dict[str, float]:
        """The service's /metrics (on its metrics port) as {"name{label=value,...}": value}."""
        async with aiohttp.ClientSession() as session, session.get(self.metrics_url) as answer:
            text = await answer.text()
        flat: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                flat[f"{sample.name}{{{labels}}}"] = sample.value
        return flat

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"service exited with code {self._process.returncode}; see {self.log_path}")

    def request_stop(self) -> None:
        """One SIGTERM (the service drains); a second would force it to stop at once, so it is never sent."""
        process = self._process
        if process is not None and process.poll() is None and not self._stop_requested:
            process.send_signal(signal.SIGTERM)
            self._stop_requested = True

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (the service drains), SIGKILL if it outlives `timeout_s`; returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            self.request_stop()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
        return process.returncode
