"""Shared pytest fixtures, and the Triton mode of the whole session.

Without a GPU, Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) so that their
tests run on the CPU. `@triton.jit` reads the variable when a kernel module is imported, so it is
set here, before any test module imports protloc. The model still runs on the torch path:
`PROTLOC_BACKEND=auto` picks Triton for CUDA tensors only, and kernel tests ask for it by name.
"""

import logging
import os
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def protloc_logger():
    """Each CLI run sets up the `protloc` logger for its process (level, handler, no propagation);
    in this one test process, put it back after every test so tests do not depend on their order."""
    logger = logging.getLogger("protloc")
    state = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(state[0])
    logger.handlers[:], logger.propagate = state[1], state[2]


@pytest.fixture
def shared_data() -> Path:
    """The folder of real microscopy data (../shared/data); skips the test when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a busy 2-core machine torch's second thread costs far more than it gives
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
