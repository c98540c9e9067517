"""The spec models: one pydantic schema for the HTTP body, the CLI file and the worker config.

loss.py (one model per topk/ loss, discriminated on `name`), data.py (the data layer's part),
train.py (TrainSpec and its cross-field rules), sweep.py (SweepSpec, apply_params), io.py (spec
files, class counts from dataset.json, field-path error lines), cli.py (`topk validate`).
Nothing here imports torch or ray at import time.
"""
