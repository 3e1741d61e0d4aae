"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors in tests are tiny: one intra-op thread is as fast, and immune to the
    oversubscription of a busy machine (which made some files 10× slower). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
