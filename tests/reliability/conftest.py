"""The reliability suite starts real processes and kills them: marked `processes`, so
`make test-fast` can leave it out (CI runs it)."""

import pytest

from tests.test_hotswap import server_side  # noqa: F401 - shared fixture


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/reliability/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.processes)
