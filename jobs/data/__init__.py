"""The data layer: WebDataset tar shards over any allowed fsspec URL.

- urls.py          protocol allow-list (`check_url`), brace expansion, `open_url` (no torch)
- dataset_info.py  the dataset.json index: classes, per-split counts and shards (no torch)
- shard_format.py  the sample convention on top of the `webdataset` package (its tar iteration,
                   grouping and TarWriter, fed streams from `open_url`): `read_shard_records`
                   (bad samples by reason, cut archives), `ShardWriter`
- sources.py       writer inputs: image folders, zips of them, IDX / .npz arrays
- writer.py        `build_shards`: seeded splits, long tail, re-encoding -> shards + dataset.json
- inspection.py    `inspect_dataset`: read and decode every sample, list the bad ones
- pipeline.py      `build_train_loader` / `build_eval_loader`: the DDP-safe input of each rank
- cli.py           `topk shards build|inspect`
"""
