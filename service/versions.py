"""The one version of the service, and the version labels it writes into queue messages and records (SPEC §4,
§5). pyproject.toml reads `__version__` from `service/__init__.py`; nothing else spells it."""

from __future__ import annotations

from service import __version__

ROUTER_VERSION = f"comms-router-{__version__}"  # metadata.router_version of every queued context
PROCESSOR_VERSION = f"comms-template-sender-{__version__}"  # processor_version of every conversation record
