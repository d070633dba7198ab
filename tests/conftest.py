import os
import sys
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A seeded generator; the seed is printed so a failure can be replayed with
    ELASTIC_EP_TEST_SEED."""
    seed = int(os.environ.get("ELASTIC_EP_TEST_SEED", "0")) or zlib.crc32(request.node.nodeid.encode())
    print(f"seed={seed} ({request.node.nodeid})")
    return np.random.default_rng(seed)
