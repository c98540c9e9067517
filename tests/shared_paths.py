"""Where the machine's shared folder is: $TOPK_SHARED_DIR when set, else ../shared next to the
repository (the folder holds data/ with the real datasets and k8s-schemas/). One definition
for every test that reads it; tests that need a file in it skip, naming the path, when absent."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOPK_SHARED_DIR") or REPO.parent / "shared")
SHARED_DATA = SHARED / "data"
OMNIGLOT_ZIP = SHARED_DATA / "omniglot" / "images_background_small1.zip"
