import os

import pytest

os.environ.setdefault("HYDRA_FULL_ERROR", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (run in CI too)")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A ResNet8 teacher trained for 3 epochs on the synthetic dataset (a real ickd teacher run)."""
    from ickd.engine import train
    from tests.helpers import compose_config

    out = tmp_path_factory.mktemp("teacher")
    summary = train(compose_config("stage=teacher", "trainer.epochs=3", "model=resnet8"), out)
    assert summary["status"] == "completed"
    assert (out / "checkpoints" / "best.pt").is_file()
    return out
