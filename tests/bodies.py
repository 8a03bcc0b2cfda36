"""Request bodies for the demo tenant: plain data, importable by the fast tests without the moto fixtures."""

from __future__ import annotations

import uuid
from typing import Any


def initiate_body(channel: str = "whatsapp", **overrides: Any) -> dict[str, Any]:
    """A valid request for the demo tenant; every call gets a fresh request_id."""
    body: dict[str, Any] = {
        "company_data": {"company_id": "ci-demo-001", "project_id": "pi-demo-001"},
        "recipient_data": {
            "recipient_first_name": "Lee",
            "recipient_last_name": "Hayton",
            "recipient_tel": "+447700900123",
            "recipient_email": "lee@example.com",
            "comms_consent": True,
        },
        "project_data": {"property": "12 Acacia Avenue", "viewing": "Saturday 10am"},
        "request_data": {
            "request_id": str(uuid.uuid4()),
            "channel_method": channel,
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
        },
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(body.get(section), dict):
            body[section] = {**body[section], **values}
        else:
            body[section] = values
    return body
