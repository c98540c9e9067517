"""The report's sections that come before any result: which grid this is (the full protocol or
a reduced one, and what a reduced grid cannot support), the setup (arms, datasets, noise
models, learning rate selection) and the rules (failed and collapsed runs, paired intervals,
the verdict rules of the claims), all from the config and the datasets' dataset.json."""

from __future__ import annotations

import json
from typing import Any

from jobs.contract.loss import LOSS_SPECS
from jobs.experiment.claims import CLAIM1_TOLERANCE
from jobs.experiment.config import DatasetConfig, ExperimentConfig
from jobs.experiment.plan import Plan, selection_seed
from jobs.experiment.summary import CHANCE_STANDARD_ERRORS, COLLAPSE_SHARE, params_text

PROTOCOL_SEEDS = 5
"""Seeds the issue's protocol asks for."""


def grid_section(config: ExperimentConfig, config_path: str | None) -> list[str]:
    """Which grid produced the page, and what a reduced one cannot support."""
    where = f"`{config_path}`" if config_path else f"config `{config.name}`"
    if config.reduced is None:
        lines = [f"- Grid: **the full protocol** ({where})."]
    else:
        lines = [
            f"- Grid: **a reduced grid** ({where}), cut down from `{config.reduced.full}`: "
            + "; ".join(config.reduced.changes)
            + "."
        ]
    limits = list(config.reduced.cannot_support) if config.reduced else []
    if len(config.seeds) < PROTOCOL_SEEDS:
        limits.append(
            f"the protocol's {PROTOCOL_SEEDS}-seed paired intervals: with {len(config.seeds)} "
            f"seed{'s' if len(config.seeds) != 1 else ''} the intervals are wider (none with 1), so a claim 2 that did not hold may only be not "
            "shown, and claim 1's 1-point tolerance is below what the intervals resolve"
        )
    if config.lr_selection is None:
        limits.append("per-loss learning rates: every arm ran with one learning rate")
    if limits:
        lines.append("- Conclusions this grid cannot support: " + "; ".join(limits) + ".")
    return lines


def setup_section(config: ExperimentConfig, plan: Plan) -> list[str]:
    training = config.training
    lines = [
        "",
        "## Setup",
        "",
        f"- Model `{training.get('model', {}).get('arch', '?')}`, trained from scratch; "
        f"optimiser {training.get('optim', {})} (the learning rate: see below); schedule "
        f"{training.get('schedule', {})}; seeds {config.seeds}.",
        "- Each run keeps the checkpoint of its best epoch on the validation split (by "
        "validation macro-average top-K) and is tested there: every test figure is that "
        "checkpoint's. The test split is read only for these figures.",
        "- Validation and test splits keep their true labels; only training labels are noised.",
        *_lr_lines(config),
        "",
        "| arm | loss | head | hyperparameters |",
        "|---|---|---|---|",
    ]
    for arm in config.losses:
        loss = config.loss_of(arm)
        head = "cosine" if LOSS_SPECS[loss].needs_cosine_head else "linear"
        lines.append(f"| `{arm}` | {loss} | {head} | {params_text(config.params_of(arm)) or '-'} |")
    lines += [
        "",
        "| dataset | study | K | classes | K/C | training labels | train / val / test images "
        "| epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset in config.datasets:
        info = json.loads(plan.datasets[dataset.name].read_text())
        lines.append(_dataset_row(config, dataset, info))
    return lines + [""]


def _lr_lines(config: ExperimentConfig) -> list[str]:
    if config.lr_selection is None:
        return [
            f"- Learning rate: {config.training.get('optim', {}).get('lr', 0.1)} for every arm."
        ]
    selection = config.lr_selection

    def grid(values: list[float]) -> str:
        return "{" + ", ".join(f"{lr:g}" for lr in values) + "}"

    own = "; ".join(f"`{arm}` from {grid(values)}" for arm, values in selection.grids.items())
    return [
        f"- Learning rate: chosen per dataset and arm from {grid(selection.grid)}"
        + (f" ({own})" if own else "")
        + f" by the validation macro-average top-K of seed {selection_seed(config)} (at its "
        "best epoch); the other seeds run with it, and the selection seed's run with the "
        "chosen rate is its final run. The choice is in *Selection* below.",
    ]


def _dataset_row(config: ExperimentConfig, dataset: DatasetConfig, info: dict[str, Any]) -> str:
    splits = info["splits"]
    classes = int(info["num_classes"])
    sizes = " / ".join(
        str(splits.get(s, {}).get("num_samples", 0)) for s in ("train", "val", "test")
    )
    changed = info.get("source", {}).get("train_labels_changed", 0)
    train = max(splits["train"]["num_samples"], 1)
    if dataset.label_noise == 0:
        labels = "clean"
    elif dataset.noise_groups == "block":
        labels = (
            f"block-of-{dataset.noise_block} noise, p = {dataset.label_noise:g} "
            f"({changed / train:.1%} wrong)"
        )
    else:
        group = {"class_prefix": "within the alphabet", "none": "any class"}[dataset.noise_groups]
        labels = f"{dataset.label_noise:.0%} replaced {group} ({changed / train:.1%} wrong)"
    if dataset.imbalance_ratio > 1:
        labels += f", long tail (ratio {dataset.imbalance_ratio:g})"
    test = f"official test set (`{dataset.test_from}`)" if dataset.test_from else ""
    epochs = config.training_for(dataset).get("epochs", "?")
    return (
        f"| {dataset.title or dataset.name} | {dataset.study} | {dataset.k} | {classes} | "
        f"{dataset.k / classes:.3f} | {labels} | {sizes}{f', {test}' if test else ''} | {epochs} |"
    )


def rules_section(config: ExperimentConfig) -> list[str]:
    """The rules, stated before the results."""
    noise, tail = config.claims.label_noise, config.claims.long_tail
    return [
        "## Rules, fixed before the results",
        "",
        "- **Paired differences.** Two arms compared on one dataset are paired by seed (same "
        "seed: same split, initial weights' seed and data order): d_i = a_i - b_i; the 95% "
        "interval is mean(d) +- t(0.975, n-1) sd(d) / sqrt(n), over the n seeds where both "
        "runs trained.",
        "- **Failed runs** produced no trained model: the run crashed (an error, a non-finite "
        "loss, its process died), or it *never trained*: at no epoch was its validation top-K "
        f"accuracy above chance, K/C plus {CHANCE_STANDARD_ERRORS:g} binomial standard errors "
        "of chance on the validation split. They are counted apart and left out of means and "
        "paired differences.",
        "- **Rank-1 collapse**: a run that trained whose best-validation checkpoint gives one "
        f"class the top-1 prediction for at least {COLLAPSE_SHARE:.0%} of the test images. "
        "Collapsed runs are results of their loss: they stay in the means, and are counted.",
        f"- **Claim 1** (label noise, test top-K): each of {_names(noise.methods)} is within "
        f"{CLAIM1_TOLERANCE * 100:g} point of the best of {_names(noise.baselines)} (the one "
        "with the higher mean: mean paired gap >= -1 point), and, on a noisy dataset, loses no "
        f"more than `{noise.reference}` from its clean twin (mean paired (method(noisy) - "
        f"method(clean)) - ({noise.reference}(noisy) - {noise.reference}(clean)) >= 0). A "
        "verdict whose interval crosses its threshold is marked *within seed noise*.",
        f"- **Claim 2** (long tail, test macro top-K): each of {_names(tail.methods)} beats each "
        f"of {_names(tail.baselines)} with a paired interval above 0.",
        "",
    ]


def _names(arms: list[str]) -> str:
    return ", ".join(f"`{arm}`" for arm in arms)
