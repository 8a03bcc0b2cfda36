"""The embedded stack every mode runs on, and the service processes started on it.

This process hosts the counting AWS proxies (one per service process), the provider sandboxes and, with
`--tracing`, the OTLP collector; it spawns moto and the service, so each service process's CPU and memory are
its own. The benchmark's own AWS calls (setup, feeding, verification) go straight to moto and are not counted.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.aws_proxy import CountingProxy
from bench.ceiling import Ceiling, measure_ceiling
from bench.otlp_collector import OtlpCollector
from bench.sandboxes import Sandboxes, start_sandboxes
from bench.service_process import ServiceProcess
from bench.update_expression import item_size
from bench.write_units import WriteUnitLedger, table_shapes
from local_stack.moto_server import LOCAL_CREDENTIALS, MotoServer, free_port, start_moto_server
from local_stack.seed import DemoTenant, seed_demo_tenant
from service.adapters.aws.provisioning import provision_resources
from service.bootstrap import Dependencies, build
from service.config import Settings, load_settings


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


@dataclass(frozen=True, slots=True)
class StackConfig:
    concurrency: int
    ai_latency_s: float
    log_level: str
    thread_latency_s: float = 0.0
    consumer_queues: str = "whatsapp"
    tracing: bool = False
    proxies: tuple[str, ...] = ("service",)  # one counting proxy per service process
    settings: dict[str, Any] = field(default_factory=dict)  # further COMMS_* settings of every service process


@dataclass(slots=True)
class Stack:
    moto: MotoServer
    proxies: dict[str, CountingProxy]
    sandboxes: Sandboxes
    settings: Settings  # pointing at moto directly (the benchmark's own calls)
    deps: Dependencies
    tenant: DemoTenant
    ledger: WriteUnitLedger
    collector: OtlpCollector | None

    @property
    def proxy(self) -> CountingProxy:
        return next(iter(self.proxies.values()))

    @property
    def queue_url(self) -> str:
        url = self.settings.whatsapp_queue_url
        assert url is not None
        return url

    def service_settings(self, proxy: str | None = None, **changes: Any) -> Settings:
        """The settings of a service process: AWS through its counting proxy, plus `changes`."""
        endpoint = self.proxies[proxy].url if proxy else self.proxy.url
        return self.settings.model_copy(update={"aws_endpoint_url": endpoint, **changes})

    def tracing_environment(self) -> dict[str, str]:
        return self.collector.environment() if self.collector is not None else {}


async def open_stack(config: StackConfig, exits: AsyncExitStack) -> Stack:
    """moto, the counting proxies, tables and queues, the sandboxes, the demo tenant (and the OTLP collector)."""
    for name, value in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    moto = await asyncio.to_thread(start_moto_server)
    exits.callback(moto.stop)
    port = free_port()
    base = load_settings(
        host="127.0.0.1",
        port=port,
        metrics_port=free_port(),
        aws_endpoint_url=moto.url,
        consumer_concurrency=config.concurrency,
        consumer_queues=config.consumer_queues,
        log_level=config.log_level,
        **config.settings,
    )
    ledger = WriteUnitLedger(table_shapes(base))
    proxies = {}
    for name in config.proxies:
        proxy = CountingProxy(moto.url, ledger)
        await proxy.start()
        exits.push_async_callback(proxy.close)
        proxies[name] = proxy
    settings = await provision_resources(base)
    sandboxes = await start_sandboxes(config.ai_latency_s, config.thread_latency_s)
    exits.push_async_callback(sandboxes.close)
    settings = settings.model_copy(
        update={
            "openai_base_url": f"{sandboxes.openai.url}/v1",
            "twilio_base_url": sandboxes.twilio.url,
            "sendgrid_base_url": sandboxes.sendgrid.url,
            "public_base_url": f"http://127.0.0.1:{port}",
        }
    )
    deps = await exits.enter_async_context(build(settings))
    tenant = await seed_demo_tenant(deps.aws, settings)
    collector = None
    if config.tracing:
        collector = OtlpCollector()
        await collector.start()
        exits.push_async_callback(collector.close)
    where = ", ".join(f"{name} {proxy.url}" for name, proxy in proxies.items())
    say(f"moto {moto.url} (pid {moto.process.pid}), counting proxies: {where}; sandboxes up, tenant seeded")
    if collector is not None:
        say(f"tracing on: the service exports OTLP/HTTP to the collector at {collector.url}")
    return Stack(moto, proxies, sandboxes, settings, deps, tenant, ledger, collector)


async def scan_items(stack: Stack, table: str) -> list[dict[str, Any]]:
    """Every item of `table` as DynamoDB JSON (Scan, directly on moto: not counted)."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"TableName": table}
    while True:
        page = await stack.deps.aws.dynamodb.scan(**params)
        items += page.get("Items", [])
        if "LastEvaluatedKey" not in page:
            return items
        params["ExclusiveStartKey"] = page["LastEvaluatedKey"]


async def prime_write_units(stack: Stack) -> None:
    """Give the write-unit ledger every item already stored (before the measured service's writes)."""
    for table in stack.ledger.shapes:
        stack.ledger.prime(table, await scan_items(stack, table))


async def shadow_drift(stack: Stack) -> dict[str, int]:
    """How far the write-unit ledger's item images are from moto's items at the end (a check of the method): items
    compared, and how many differ in size, are only in moto, or only in the ledger."""
    drift = {"items": 0, "size_differs": 0, "only_in_moto": 0, "only_in_ledger": 0}
    for table, shape in stack.ledger.shapes.items():
        shadow = dict(stack.ledger.items[table])
        for item in await scan_items(stack, table):
            drift["items"] += 1
            image = shadow.pop(stack.ledger.key_of(shape, item), None)
            if image is None:
                drift["only_in_moto"] += 1
            elif item_size(image) != item_size(item):
                drift["size_differs"] += 1
        drift["only_in_ledger"] += len(shadow)
    return drift


async def measure_ceilings(stack: Stack, duration_s: float) -> list[Ceiling]:
    """The local AWS endpoint's ceiling, directly on moto and through the (first) proxy, before the service runs."""
    key = (stack.tenant.company_id, stack.tenant.project_id)
    queue = stack.settings.replies_queue_url or stack.queue_url
    ceilings = []
    for endpoint in (stack.moto.url, stack.proxy.url):
        ceiling = await measure_ceiling(
            stack.settings, endpoint, key, queue, stack.moto.process.pid, duration_s=duration_s
        )
        say(
            f"endpoint ceiling {endpoint}: {ceiling.requests_per_s:.0f} req/s, "
            f"moto {ceiling.moto_cpu_ms_per_request:.1f} ms CPU per request ({ceiling.moto_cpu_share:.0%} of a core)"
        )
        ceilings.append(ceiling)
    # The burst's requests through the proxy are not the service's: start its counts from zero.
    for proxy in stack.proxies.values():
        proxy.counter.requests.clear()
        proxy.counter.errors.clear()
        proxy.counter.upstream_s.clear()
        proxy.counter.write_units.clear()
    return ceilings


async def start_service(
    stack: Stack, exits: AsyncExitStack, settings: Settings, role: str, log_path: Path
) -> ServiceProcess:
    """`python -m service serve --role <role>` with `settings` (and the OTEL_* variables when tracing); ready."""
    service = ServiceProcess(settings, log_path, role, stack.tracing_environment())
    service.start()
    exits.callback(service.stop)
    await service.wait_ready()
    return service
