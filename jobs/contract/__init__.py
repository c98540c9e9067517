"""The contract between the layers: what the service and the runtime must agree on, and the only
part of `jobs` that `service` imports. Nothing here imports torch, topk or webdataset (ray only
inside the one function that builds a Ray Tune search space).

The spec models, one pydantic schema for the HTTP body, the CLI file and the worker config:
- loss.py         one model per topk/ loss, discriminated on `name`; the class-counts rule
- data.py         the data part (shard sources, augmentation, decoding)
- checkpoint.py   the checkpoint part (`keep_best`, formerly `keep_last`)
- train.py        TrainSpec and its cross-field rules; the metric names a run reports
- sweep.py        SweepSpec, apply_params, describe_best
Reading and reporting them:
- spec_files.py   spec files (YAML/JSON, bounded), parse_spec, resolve_class_counts
- spec_errors.py  validation errors as "field.path: message" lines
- cli.py          `topk validate`
What runs touch:
- urls.py         the protocol allow-list, check_url, the one data-source parser (parse_source),
                  brace expansion, open_url
- dataset_info.py the dataset.json index
- run_files.py    the run folder's layout (ROOT/RUN/spec.json, metrics.jsonl, result.json,
                  sweep.json, trials/), its readers and writers, the run-name rule
- selection.py    the best record by a metric (best epoch, best trial, best run)
- exit_codes.py   the exit codes every command shares
"""
