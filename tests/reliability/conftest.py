from tests.test_hotswap import server_side  # noqa: F401 - shared fixture
