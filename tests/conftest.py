import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import timm_arm  # noqa: F401  registers the models


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh, test-specific seed: random inputs differ between tests but each test is reproducible
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2 ** 31))
