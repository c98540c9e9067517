"""The worker's session is a declared interface (`WorkerSession`) with two implementations,
Ray Train's (`RayTrainSession`) and the in-process one (`LocalSession`); and the metrics the loop
reports are named as the spec's torch-free list says (`reported_metrics`)."""

from __future__ import annotations

import inspect

import pytest
import torch

from jobs.contract.train import reported_metrics
from jobs.training.session import LocalSession, RayTrainSession, WorkerSession
from jobs.training.worker import VAL_PREFIX
from topk.metrics import TopKCounts

METHODS = ("resume_directory", "prepare_model", "report")


def test_the_protocol_declares_what_the_loop_uses():
    members = {name for name in vars(WorkerSession) if not name.startswith("_")}
    assert members == {"rank", "world_size", "device", *METHODS}


@pytest.mark.parametrize("session_class", [RayTrainSession, LocalSession])
def test_each_session_has_the_protocol_methods_with_its_signatures(session_class):
    for name in METHODS:
        declared = inspect.signature(getattr(WorkerSession, name))
        implemented = inspect.signature(getattr(session_class, name))
        assert list(implemented.parameters) == list(declared.parameters), name


def test_a_local_session_is_a_worker_session(tmp_path):
    session = LocalSession(str(tmp_path), select=None, mode="max", keep=1, device="cpu")
    assert isinstance(session, WorkerSession)
    assert (session.rank, session.world_size, session.device) == (0, 1, torch.device("cpu"))
    with session.resume_directory() as directory:
        assert directory is None  # nothing to resume yet


@pytest.mark.parametrize("ks", [[1, 5], [3], [5, 1, 2]])
def test_the_loop_reports_the_metric_names_the_spec_lists(ks):
    counts = TopKCounts.zeros(10, sorted(set(ks)))  # what the loop evaluates with
    reported = {"train_loss", *counts.to_metrics(VAL_PREFIX)}
    assert reported == set(reported_metrics(ks, has_val=True))
    assert set(reported_metrics(ks, has_val=False)) == {"train_loss"}
