"""Every test in this folder runs against the real services (broker, registry, Docker
engine, ...): marked ``e2e`` so that ``-m "not e2e"`` also works from the top folder."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
