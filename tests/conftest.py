"""Session-wide test setup.

Without a CUDA device the Triton kernels of topk/ (topk.fused_selection, topk.fused_polynomial)
are tested through Triton's interpreter. The interpreter must be chosen before the first
`import triton` anywhere in the process (triton.language's own @jit helpers, such as its random
number generators, are wrapped at import time), and some tests outside tests/topk import it
through torch (torch.compile, inductor). This file is loaded before any test module, so the choice
is made here.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
