"""Every registered loss through the registry: construction, errors, dtypes, seeding, training."""

import inspect
import subprocess
import sys

import pytest
import torch

import topk
from topk.heads import CosineHead
from topk.metrics import topk_counts

NUM_CLASSES = 10
CLASS_COUNTS = [50, 30, 20, 10, 8, 5, 3, 2, 1, 0]
STOCHASTIC = {"noised_topk", "noised_topk_imbalanced"}
ALL_LOSSES = topk.list_losses()


def make_loss(name: str, **params):
    if topk.get_loss_class(name).needs_class_counts:
        params.setdefault("class_counts", CLASS_COUNTS)
    return topk.create_loss(name, **params)


def make_scores(name: str, batch: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, NUM_CLASSES, generator=gen)
    if topk.get_loss_class(name).needs_cosine_head:
        scores = scores.tanh()
    return scores.to(dtype)


def test_registry_lists_the_contracted_names():
    expected = sorted(
        [
            "cross_entropy",
            "focal",
            "ldam",
            "logit_adjusted",
            "noised_topk",
            "noised_topk_imbalanced",
            "smooth_topk_svm",
            "topk_hinge",
        ]
    )
    assert expected == ALL_LOSSES


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_class_attributes_and_keyword_only_arguments(name):
    cls = topk.get_loss_class(name)
    assert isinstance(cls.needs_cosine_head, bool) and isinstance(cls.needs_class_counts, bool)
    assert cls.needs_cosine_head == (name in {"ldam", "noised_topk_imbalanced"})
    assert cls.needs_class_counts == (name in {"ldam", "logit_adjusted", "noised_topk_imbalanced"})
    if cls.__init__ is torch.nn.Module.__init__:
        return  # no arguments at all
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        assert param.kind is inspect.Parameter.KEYWORD_ONLY
        assert param.default is not inspect.Parameter.empty


@pytest.mark.parametrize(
    ("name", "params", "shown"),
    [
        ("cross_entropy", {}, ""),
        ("focal", {"gamma": 1.5}, "gamma=1.5"),
        ("ldam", {}, "max_m=0.2, scale=40.0, num_classes=10"),
        ("logit_adjusted", {"tau": 0.5}, "tau=0.5, num_classes=10"),
        ("noised_topk", {"k": 3}, "k=3, epsilon=1.0, n_samples=5, sampler='full'"),
        (
            "noised_topk_imbalanced",
            {"sampler": "lazy"},
            "k=5, epsilon=0.01, n_samples=5, max_m=0.2, scale=60.0, num_classes=10, sampler='lazy'",
        ),
        ("smooth_topk_svm", {}, "k=5, tau=0.1, alpha=1.0"),
        ("topk_hinge", {"k": 2}, "k=2"),
    ],
)
def test_repr_shows_the_constructor_arguments(name, params, shown):
    loss = make_loss(name, **params)
    assert repr(loss) == f"{type(loss).__name__}({shown})"


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="'hinge_plus'.*cross_entropy.*topk_hinge"):
        topk.create_loss("hinge_plus")


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_unknown_parameter_names_the_loss(name):
    with pytest.raises(ValueError, match=f"{name}.*bogus"):
        make_loss(name, bogus=1)


BAD_VALUES = [
    ("focal", "gamma", -1.0),
    ("ldam", "max_m", -0.1),
    ("ldam", "class_counts", [1, 2, float("nan")]),
    ("logit_adjusted", "tau", float("inf")),
    ("noised_topk", "k", 0),
    ("noised_topk", "epsilon", 0.0),
    ("noised_topk", "n_samples", 0),
    ("noised_topk_imbalanced", "scale", -60.0),
    ("noised_topk_imbalanced", "class_counts", None),
    ("smooth_topk_svm", "tau", 0.0),
    ("smooth_topk_svm", "k", 2.5),
    ("topk_hinge", "k", -1),
]


@pytest.mark.parametrize(("name", "field", "value"), BAD_VALUES)
def test_bad_value_names_the_argument(name, field, value):
    with pytest.raises(ValueError, match=field):
        make_loss(name, **{field: value})


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_bad_sampler_lists_the_choices(name):
    with pytest.raises(ValueError, match="full.*lazy|lazy.*full"):
        make_loss(name, sampler="exact")


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_batch_of_one_gives_finite_value_and_gradient(name):
    scores = make_scores(name, 1).requires_grad_()
    loss = make_loss(name)(scores, torch.tensor([3]), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_half_precision_returns_input_dtype(name, dtype):
    loss = make_loss(name)
    scores = make_scores(name, 16, dtype=dtype).requires_grad_()
    labels = torch.arange(16) % NUM_CLASSES
    value = loss(scores, labels, torch.Generator().manual_seed(1))
    value.backward()
    assert value.dtype == dtype and torch.isfinite(value)
    assert scores.grad.dtype == dtype and torch.isfinite(scores.grad).all()
    # Same noise on the same (rounded) scores in float32: the same value up to rounding.
    full = loss(scores.detach().float(), labels, torch.Generator().manual_seed(1))
    assert value.float().item() == pytest.approx(full.item(), rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_autocast_runs(name):
    loss = make_loss(name)
    scores = make_scores(name, 8).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(scores * 1.0, torch.arange(8), torch.Generator().manual_seed(0))
    value.float().backward()
    assert torch.isfinite(value) and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_generator_makes_the_value_reproducible(name):
    loss = make_loss(name)
    scores = make_scores(name, 32)
    labels = torch.arange(32) % NUM_CLASSES
    first = loss(scores, labels, torch.Generator().manual_seed(5))
    again = loss(scores, labels, torch.Generator().manual_seed(5))
    other = loss(scores, labels, torch.Generator().manual_seed(6))
    assert first.item() == again.item()
    if name in STOCHASTIC:
        assert first.item() != other.item()
    else:
        assert first.item() == other.item() == loss(scores, labels).item()


BAD_INPUTS = [
    ("NaN", lambda s, y: (s.clone().fill_(float("nan")), y)),
    ("out of range", lambda s, y: (s, y.clone().fill_(NUM_CLASSES))),
    ("out of range", lambda s, y: (s, y.clone().fill_(-1))),
    (r"shape \[batch, num_classes\]", lambda s, y: (s[0], y)),
    ("labels must have shape", lambda s, y: (s, y[:2])),
    ("integer", lambda s, y: (s, y.float())),
]


@pytest.mark.parametrize(("message", "corrupt"), BAD_INPUTS)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bad_input_raises_a_clear_error(name, message, corrupt):
    scores, labels = corrupt(make_scores(name, 4), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=message):
        make_loss(name)(scores, labels)


@pytest.mark.parametrize("name", ["noised_topk", "noised_topk_imbalanced", "smooth_topk_svm"])
def test_k_too_large_is_a_clear_error(name):
    scores = torch.zeros(2, NUM_CLASSES)
    with pytest.raises(ValueError, match="k \\+ 1"):
        make_loss(name, k=NUM_CLASSES)(scores, torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_loss_decreases_on_a_separable_problem(name):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_CLASSES, 16, generator=gen) * 3  # one centre per class
    labels = torch.arange(NUM_CLASSES).repeat(8)
    inputs = features[labels] + 0.3 * torch.randn(len(labels), 16, generator=gen)
    loss_cls = topk.get_loss_class(name)
    torch.manual_seed(0)
    model = CosineHead(16, NUM_CLASSES) if loss_cls.needs_cosine_head else torch.nn.Linear(16, 10)
    loss = make_loss(name, k=2) if "k" in inspect.signature(loss_cls).parameters else None
    loss = loss or make_loss(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 if loss_cls.needs_cosine_head else 0.1)
    noise = torch.Generator().manual_seed(1)
    values = []
    for _ in range(30):
        value = loss(model(inputs), labels, noise)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    with torch.no_grad():
        scores = model(inputs)
        final = loss(scores, labels, torch.Generator().manual_seed(2)).item()
    assert final < 0.5 * values[0]
    if name == "topk_hinge":
        # The hard hinge is flat (loss 1, zero gradient) where the label sits exactly at rank
        # k + 1: it drives labels up to that rank but not past it - the reason to smooth it.
        return
    # The top-k losses (k=2 here) only ask for the label among the top 2.
    assert topk_counts(scores, labels, [2]).accuracy(2) > 0.9


def test_importing_topk_imports_no_service_frameworks():
    code = (
        "import sys, topk, topk.metrics, topk.heads\n"
        "bad = sorted(m for m in ('ray', 'fastapi', 'pydantic') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
