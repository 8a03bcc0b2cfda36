"""The OpenAPI 3.1 document served at /openapi.json, built from the error-code enum so they cannot drift."""

from __future__ import annotations

from typing import Any

from service.domain.errors import ErrorCode
from service.domain.initiate import E164_PATTERN, SUPPORTED_CHANNELS, UUID4_PATTERN

_JSON = "application/json"


# What DynamoDB and SQS take (`initiate.unstorable_reason`): strings without U+FFFE/U+FFFF, numbers in range.
_SQS_TEXT = "^[^\\uFFFE\\uFFFF]*$"
_STORABLE_SCALAR: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": _SQS_TEXT},
        {"type": "number", "minimum": 1e-130, "exclusiveMaximum": 1e126},
        {"type": "number", "maximum": -1e-130, "exclusiveMinimum": -1e126},
        {"const": 0},
        {"type": "boolean"},
        {"type": "null"},
    ]
}


def _error_response(description: str, status: int) -> dict[str, Any]:
    codes = [code.value for code in ErrorCode if code.http_status == status]
    schema = {"allOf": [{"$ref": "#/components/schemas/ErrorBody"}, {"properties": {"error_code": {"enum": codes}}}]}
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _request_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["company_data", "recipient_data", "request_data"],
        "properties": {
            "company_data": {
                "type": "object",
                "required": ["company_id", "project_id"],
                "properties": {
                    "company_id": {"type": "string", "minLength": 1},
                    "project_id": {"type": "string", "minLength": 1},
                },
            },
            "recipient_data": {
                "type": "object",
                "required": ["comms_consent"],
                "properties": {
                    "recipient_first_name": {"type": "string", "pattern": _SQS_TEXT},
                    "recipient_last_name": {"type": "string", "pattern": _SQS_TEXT},
                    "recipient_tel": {"type": "string", "pattern": E164_PATTERN},
                    "recipient_email": {"type": "string", "format": "email"},
                    "comms_consent": {"type": "boolean"},
                },
            },
            "project_data": {
                "type": "object",
                "description": "Passed to the AI as context. At any depth (at most 16): numbers DynamoDB stores"
                " (0, or a magnitude from 1e-130 to below 1e126) and no U+FFFE/U+FFFF (outside SQS's character set)",
                "additionalProperties": {
                    "anyOf": [
                        _STORABLE_SCALAR,
                        {"type": "array", "items": _STORABLE_SCALAR},
                        {"type": "object", "additionalProperties": _STORABLE_SCALAR},
                    ]
                },
            },
            "request_data": {
                "type": "object",
                "required": ["request_id", "channel_method", "initial_request_timestamp"],
                "properties": {
                    "request_id": {
                        "type": "string",
                        "pattern": UUID4_PATTERN,
                        "description": "Lowercase hyphenated UUID v4; repeats of one request_id queue once",
                    },
                    "channel_method": {"type": "string", "enum": list(SUPPORTED_CHANNELS)},
                    "initial_request_timestamp": {"type": "string", "format": "date-time"},
                },
            },
        },
    }


def openapi_document(version: str) -> dict[str, Any]:
    plain_ok = {"description": "OK", "content": {_JSON: {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "AI Multi-Comms Engine", "version": version},
        "paths": {
            "/initiate-conversation": {
                "post": {
                    "summary": "Start an AI-written conversation on WhatsApp, SMS or email",
                    "security": [{"ApiKey": []}],
                    "requestBody": {"required": True, "content": {_JSON: {"schema": _request_schema()}}},
                    "responses": {
                        "200": {
                            "description": "Accepted and queued (or a repeat of an accepted request_id)",
                            "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Accepted"}}},
                        },
                        "400": _error_response("Invalid request", 400),
                        "401": _error_response("Missing or unknown API key", 401),
                        "403": _error_response("Key not authorised, project inactive or channel not allowed", 403),
                        "404": _error_response("Company/project not found", 404),
                        "409": _error_response("The same request_id is being queued right now", 409),
                        "413": _error_response("Body over 64 KiB", 413),
                        "422": _error_response(
                            "No consent, recipient opted out, or request_id reused with a different body", 422
                        ),
                        "431": _error_response("Request headers too large", 431),
                        "429": _error_response("Rate limit exceeded; see Retry-After", 429),
                        "500": _error_response("Configuration or internal error", 500),
                        "503": _error_response("DynamoDB or SQS unavailable or over the request deadline; retry", 503),
                    },
                },
                "options": {"summary": "CORS preflight", "responses": {"200": {"description": "CORS headers"}}},
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": plain_ok}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: AWS reachable, consumers running",
                    "responses": {
                        "200": plain_ok,
                        "503": {"description": "Not ready", "content": {_JSON: {"schema": {"type": "object"}}}},
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {
                "Accepted": {
                    "type": "object",
                    "required": ["status", "request_id", "conversation_id", "message", "queue_timestamp"],
                    "properties": {
                        "status": {"const": "success"},
                        "request_id": {"type": "string"},
                        "conversation_id": {"type": "string"},
                        "message": {"type": "string"},
                        "queue_timestamp": {"type": "string"},
                    },
                },
                "ErrorBody": {
                    "type": "object",
                    "required": ["status", "error_code", "message", "request_id"],
                    "properties": {
                        "status": {"const": "error"},
                        "error_code": {"type": "string", "enum": [code.value for code in ErrorCode]},
                        "message": {"type": "string"},
                        "request_id": {"type": "string"},
                    },
                },
            },
        },
    }
