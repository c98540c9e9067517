"""The data layer: WebDataset tar shards over any allowed fsspec URL.

URLs (`open_url`, the protocol allow-list) and the dataset.json index are part of the contract
(jobs/contract/urls.py, jobs/contract/dataset_info.py); this package reads and writes the shards.

Shards:
- shard_format.py   the sample convention: member extensions, key/extension split, labels
                    (`.cls` or a `.json` field), RawSample / BadRecord, SKIP_REASONS
- tar_bytes.py      a shard's uncompressed tar bytes, and whether the archive was whole
- shard_reader.py   `read_shard_records`: webdataset's tar iteration and grouping on our opener's
                    stream -> samples or bad records by reason; readers split a shard by index
- shard_writer.py   `ShardWriter`: numbered tars through webdataset's TarWriter
- sources.py        writer inputs: image folders, zips of them, IDX / .npz arrays
- writer.py         `build_shards`: seeded splits, long tail, re-encoding -> shards + dataset.json
- inspection.py     `inspect_dataset`: read and decode every sample, list the bad ones
- cli.py            `topk shards build|inspect`

The input of a training rank (pipeline.py puts it together):
- shards.py         `resolve_shards` (once per run), `plan_readers` (rank x worker slots),
                    `steps_per_epoch`, DataPipelineError
- shard_stream.py   `ShardStream`: what each DataLoader worker runs (read, count, shuffle, batch)
- image_decode.py   the crop and flip of a sample (`choose_view`), decoding in a worker
                    (data.decode cpu: PIL, or torchvision for RGB JPEG and PNG; RGB resized
                    by torch), the JPEG header check (data.decode device)
- batching.py       batch assembly per data.decode: decoded uint8 pixels (normalised by the
                    rank: `normalise_pixels` on the host, `PixelBatch` on a GPU), or JPEG bytes
                    and views
- device_decode.py  `JpegBatch.decode`: a batch of JPEGs decoded on the training device
- pipeline.py       `build_train_loader` / `build_eval_loader` -> ShardLoader: the DDP-safe input
                    of each rank (equal steps per rank, exact evaluation)
"""
