import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds."""
    import random
    import numpy as np
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
