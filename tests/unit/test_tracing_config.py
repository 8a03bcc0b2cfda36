"""When the OTEL_* variables turn tracing on (`service.tracing.tracing_wanted`), and what they are refused for."""

from __future__ import annotations

import pytest

from service.config import ConfigurationError
from service.tracing import tracing_wanted

ENDPOINT = "http://collector:4318"


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "comms", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),  # the exporter's default endpoint, localhost:4318
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
        ({"OTEL_TRACES_EXPORTER": " OTLP "}, True),
    ],
)
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_configured(environ, wanted):
    assert tracing_wanted(environ) is wanted


@pytest.mark.parametrize("protocol", ["grpc", "http/json"])
@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
def test_an_otlp_protocol_other_than_http_protobuf_is_refused(variable, protocol):
    with pytest.raises(ConfigurationError, match="http/protobuf"):
        tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, variable: protocol})


def test_the_traces_protocol_overrides_the_general_one():
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert tracing_wanted(environ) is True


def test_a_protocol_is_not_checked_while_tracing_is_off():
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) is False


@pytest.mark.parametrize("exporter", ["console", "zipkin", "otlp,console"])
def test_an_exporter_other_than_otlp_or_none_is_refused(exporter):
    with pytest.raises(ConfigurationError, match="OTEL_TRACES_EXPORTER"):
        tracing_wanted({"OTEL_TRACES_EXPORTER": exporter})
