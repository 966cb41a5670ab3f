import pytest
import torch

# The tiny models are far too small to gain from intra-op threads; on a shared 2-core machine
# the thread pool makes them 10-50x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
