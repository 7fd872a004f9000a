import os

import pytest

os.environ.setdefault("HYDRA_FULL_ERROR", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (run in CI too)")
