import os

import pytest
import torch

from falcon.testing import make_tiny_model

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Under pytest-xdist (make test: 2 workers) each worker gets its share of the cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """For `--dist loadgroup`: the end-to-end tests (marked slow) all run on one worker, one after the other in
    file order, as without xdist (they start Ray clusters and servers sized for the machine); each unit-test module
    runs on one worker, so its module fixtures are built once."""
    for item in items:
        group = "end-to-end" if item.get_closest_marker("slow") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


def tiny_causal_lm(family: str = "llama", vocab_size: int = 300, seed: int = 0):
    """A random fp32 target without a tokenizer (falcon.testing.make_tiny_model); the larger init range keeps
    greedy decoding away from ties."""
    return make_tiny_model(family, vocab_size=vocab_size, seed=seed, initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return tiny_causal_lm("qwen2", seed=1)


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models gain nothing from two threads, and on a busy 2-core machine two threads wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
