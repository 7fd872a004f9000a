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


@pytest.fixture(scope="session")
def slurm_env(request):
    """One private single-node SLURM cluster (slurm/cluster.sh) for the whole session, with
    SLURM_CONF exported to the tests (and restored after). Skips when SLURM is not installed,
    except under CI (env CI set), where these tests must run: then it fails."""
    from tests.services import slurm_available, slurm_cluster

    reason = slurm_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    old = os.environ.get("SLURM_CONF")
    with slurm_cluster() as info:
        os.environ["SLURM_CONF"] = info["SLURM_CONF"]
        try:
            yield info
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
            # Keep the cluster's logs when something failed.
            info["keep"] = request.session.testsfailed > 0
