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


class _DeprecationLog:
    """Collects transformers' logger warnings about renamed arguments (`past_key_values` ->
    `cache` and the like), which it prints only once per process and never as a Python warning."""

    def __init__(self):
        import logging

        self.records = []
        self.handler = logging.Handler()
        self.handler.emit = self._emit

    def _emit(self, record):
        msg = record.getMessage()
        if "deprecated" in msg and ("cache" in msg or "past_key_values" in msg):
            self.records.append(msg)


@pytest.fixture(autouse=True)
def no_renamed_argument_warnings():
    """Fail a test in which the package or the tests call transformers with an outdated argument
    name: the seam (token_prune/hf.py) must pass what the installed release expects."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    hf_logging.warning_once.cache_clear()  # so every test reports its own calls
    log = _DeprecationLog()
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(log.handler)
    try:
        yield
    finally:
        logger.removeHandler(log.handler)
    if log.records:
        pytest.fail("transformers warned about a renamed argument: " + "; ".join(sorted(set(log.records))))
