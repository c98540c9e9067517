"""Session-wide test setup.

Without a CUDA device the Triton kernels of topk/ (topk.fused_selection, topk.fused_polynomial)
are tested through Triton's interpreter. The interpreter must be chosen before the first
`import triton` anywhere in the process (triton.language's own @jit helpers, such as its random
number generators, are wrapped at import time), and some tests outside tests/topk import it
through torch (torch.compile, inductor). This file is loaded before any test module, so the choice
is made here.

The shared data (real datasets too large for the repository) lives in `../shared/data` next to
the repository root; the `shared_data` and `omniglot_zip` fixtures find it there, and skip the
test, saying where they looked, when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared_paths import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder, ../shared/data relative to the repository root (it may not
    exist: tests that need a file in it skip through a fixture such as `omniglot_zip`)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def omniglot_zip(shared_data: Path) -> Path:
    """Omniglot's images_background_small1.zip (the real data of the training and experiment
    tests); skips the test when the shared data does not hold it."""
    path = shared_data / "omniglot" / "images_background_small1.zip"
    if not path.is_file():
        pytest.skip(f"the Omniglot zip is not at {path} (../shared/data next to the checkout)")
    return path
