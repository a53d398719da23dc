import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_kernels.py). The variable is read
# when triton is imported, which nothing has done yet: timm_arm imports triton only where its kernels are used.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import timm_arm  # noqa: F401  registers the models


@pytest.fixture(autouse=True)
def _seed(request):
    # a test-specific seed: random inputs differ between tests, and each test sees the same ones in every run
    # (str hash() is salted per process, crc32 is not)
    # TIMM_ARM_TEST_SEED shifts every seed, to run the numerical checks on other random draws
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get('TIMM_ARM_TEST_SEED', 0)))
