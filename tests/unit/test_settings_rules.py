"""Settings that contradict each other stop start-up with a message naming the problem."""

from __future__ import annotations

import pytest

from service.config import ConfigurationError, load_settings


def test_duplicate_wait_longer_than_the_request_deadline_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="duplicate_wait_s must be shorter than request_deadline_s"):
        load_settings(duplicate_wait_s=5.0, request_deadline_s=5.0)


def test_duplicate_wait_shorter_than_the_request_deadline_is_accepted() -> None:
    settings = load_settings(duplicate_wait_s=1.5, request_deadline_s=4.0)
    assert (settings.duplicate_wait_s, settings.request_deadline_s) == (1.5, 4.0)
