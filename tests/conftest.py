import sys
from pathlib import Path

import pytest
import torch

# One thread: the models in these tests are small, and on a busy 2-core machine a second thread mostly waits.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stage files live at the top level

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """The public benchmark and trajectory files that sit beside the checkout (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (public data files beside the checkout)")
    return SHARED_DATA


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs whole stages as subprocesses (deselect with -m 'not slow')")
