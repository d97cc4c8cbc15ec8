"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def sb3_log_dir(tmp_path_factory):
    """Stable-Baselines3's default logger makes a folder (SB3_LOGDIR, else one per call in the system temp
    directory) each time a model without a custom logger starts `learn`: keep the tests' in pytest's temp folder
    (one for the session, not a temp folder made for every test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3_log")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: on the shared 2-core CI machine, thread start-up and contention cost
    tiny networks more than they give. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
