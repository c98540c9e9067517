"""The paper's claims, tested on the run records by fixed rules written on the page before the
results (protocol.py prints them; these functions apply them), with paired differences over
seeds (same seed, same split: stats.py) and their 95% intervals.

- Claim 1 (label noise), on each label-noise dataset D, for each method arm m (`noised_topk`):
  (a) gap = m - best, on test top-K, where best is the baseline (cross-entropy or the smooth
      SVM) with the higher mean on D; (b) on a noisy D with a clean twin D0, how much more m
      loses than the reference arm (cross-entropy) from D0 to D:
      extra = (m(D) - m(D0)) - (ref(D) - ref(D0)), seed by seed.
  Held when mean gap >= -1 point and (on a noisy D) mean extra >= 0; the intervals are given,
  and a verdict whose interval crosses its threshold is marked "within seed noise".
- Claim 2 (long tail), on each long-tailed dataset, for each method arm
  (`noised_topk_imbalanced`): on test macro top-K, the paired difference with every baseline
  has its whole 95% interval above 0.
A comparison needs at least 2 seeds where both runs trained (failed runs are left out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jobs.experiment.config import DatasetConfig, ExperimentConfig
from jobs.experiment.plan import Plan
from jobs.experiment.stats import PairedDifference, paired_difference
from jobs.experiment.summary import seed_values

CLAIM1_TOLERANCE = 0.01
"""Claim 1: within 1 point (accuracies are fractions) of the best baseline."""


@dataclass
class Verdict:
    claim: str  # "1" or "2"
    dataset: str
    method: str
    held: bool | None  # None: not measured
    text: str


def paired(a: dict[int, float], b: dict[int, float]) -> PairedDifference:
    """a - b (seed -> value each) over the seeds both have."""
    common = sorted(set(a) & set(b))
    return paired_difference([a[s] for s in common], [b[s] for s in common])


def _crosses(diff: PairedDifference, threshold: float) -> bool:
    return diff.n >= 2 and diff.low < threshold < diff.high


def noise_verdicts(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]], dataset: DatasetConfig
) -> list[Verdict]:
    """Claim 1 on one label-noise dataset, one verdict per method arm present."""
    rule = config.claims.label_noise
    arms = set(config.arms_for(dataset))
    key = f"top{dataset.k}"

    def values(name: str, arm: str) -> dict[int, float]:
        return seed_values(plan, records, name, arm, key)

    means = {
        b: math.fsum(v.values()) / len(v)
        for b in rule.baselines
        if b in arms and (v := values(dataset.name, b))
    }
    verdicts = []
    for method in (m for m in rule.methods if m in arms):
        if not means:
            verdicts.append(Verdict("1", dataset.name, method, None, "no trained baseline"))
            continue
        best = max(means, key=lambda b: means[b])
        gap = paired(values(dataset.name, method), values(dataset.name, best))
        text = f"gap to {best}: {gap.text()}"
        checks = [(gap, -CLAIM1_TOLERANCE, "gap")]
        if dataset.clean is not None and dataset.label_noise > 0:
            extra = _extra_drop(values, dataset, method, rule.reference)
            text += f"; change from clean minus {rule.reference}'s: {extra.text()}"
            checks.append((extra, 0.0, "change"))
        if any(diff.n < 2 for diff, _, _ in checks):
            verdicts.append(Verdict("1", dataset.name, method, None, text))
            continue
        held = all(diff.mean >= threshold for diff, threshold, _ in checks)
        noisy = [name for diff, threshold, name in checks if _crosses(diff, threshold)]
        if noisy:
            text += f" (within seed noise: {', '.join(noisy)})"
        verdicts.append(Verdict("1", dataset.name, method, held, text))
    return verdicts


def _extra_drop(
    values: Any, dataset: DatasetConfig, method: str, reference: str
) -> PairedDifference:
    """(method(D) - method(D0)) - (reference(D) - reference(D0)), seed by seed."""
    clean = dataset.clean or ""
    mine, mine0 = values(dataset.name, method), values(clean, method)
    ref, ref0 = values(dataset.name, reference), values(clean, reference)
    seeds = sorted(set(mine) & set(mine0) & set(ref) & set(ref0))
    return paired_difference([mine[s] - mine0[s] for s in seeds], [ref[s] - ref0[s] for s in seeds])


def long_tail_verdicts(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]], dataset: DatasetConfig
) -> list[Verdict]:
    """Claim 2 on one long-tailed dataset, one verdict per method arm present."""
    rule = config.claims.long_tail
    arms = set(config.arms_for(dataset))
    key = f"macro_top{dataset.k}"
    baselines = [b for b in rule.baselines if b in arms]
    verdicts = []
    for method in (m for m in rule.methods if m in arms):
        mine = seed_values(plan, records, dataset.name, method, key)
        diffs = {
            b: paired(mine, seed_values(plan, records, dataset.name, b, key)) for b in baselines
        }
        # A baseline with fewer than 2 seeds paired (its runs or the method's failed) cannot be
        # judged; the others still can: the claim fails on any of them, and holds only when
        # every baseline was judged and beaten.
        unpaired = [b for b, d in diffs.items() if d.n < 2]
        judged = {b: d for b, d in diffs.items() if d.n >= 2}
        if not judged:
            verdicts.append(
                Verdict(
                    "2",
                    dataset.name,
                    method,
                    None,
                    f"fewer than 2 paired seeds: {', '.join(unpaired) or 'no baseline'}",
                )
            )
            continue
        closest = min(judged, key=lambda b: judged[b].low)
        shown = [b for b, d in judged.items() if d.above]
        worse = [b for b, d in judged.items() if d.high < 0]
        text = (
            f"closest baseline {closest}: {judged[closest].text()}; beaten (interval above 0) "
            f"by {len(shown)} of {len(judged)}"
        )
        if worse:
            text += f"; worse beyond seed noise than {', '.join(worse)}"
        text += "; all: " + ", ".join(f"{b} {d.short()}" for b, d in judged.items())
        if unpaired:
            text += f"; not judged (fewer than 2 paired seeds): {', '.join(unpaired)}"
        held: bool | None = len(shown) == len(judged)
        if held and unpaired:
            held = None  # beat every baseline it could be paired with, but not all were
        verdicts.append(Verdict("2", dataset.name, method, held, text))
    return verdicts


def all_verdicts(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[Verdict]:
    verdicts = []
    for dataset in config.datasets:
        if dataset.study == "label_noise":
            verdicts += noise_verdicts(config, plan, records, dataset)
        else:
            verdicts += long_tail_verdicts(config, plan, records, dataset)
    return verdicts


def claims_section(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[str]:
    """The report's verdicts: a table and a tally per claim."""
    lines = [
        "## The paper's claims on these data",
        "",
        "By the rules above; paired differences in points of test accuracy (method minus "
        "baseline, same seed and split), with their 95% intervals.",
        "",
        "| claim | dataset | method | held? | paired differences |",
        "|---|---|---|---|---|",
    ]
    names = {True: "**held**", False: "**did not hold**", None: "not measured"}
    verdicts = all_verdicts(config, plan, records)
    for v in verdicts:
        lines.append(f"| {v.claim} | {v.dataset} | `{v.method}` | {names[v.held]} | {v.text} |")
    tally = []
    for claim in ("1", "2"):
        measured = [v for v in verdicts if v.claim == claim and v.held is not None]
        if measured:
            held = sum(bool(v.held) for v in measured)
            tally.append(f"claim {claim} held in {held} of {len(measured)} measured comparisons")
    if tally:
        lines += ["", "In short: " + "; ".join(tally) + "."]
    return lines + [""]


def k_section(
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> list[str]:
    """K against C: the same long-tailed data scored at several K (datasets sharing their
    shards), claim 2's methods against their best baseline at each K."""
    from jobs.experiment.datasets import dataset_folders
    from jobs.experiment.summary import row_of

    folders = dataset_folders(config)
    families: dict[str, list[DatasetConfig]] = {}
    for dataset in config.datasets:
        if dataset.study == "long_tail":
            families.setdefault(folders[dataset.name], []).append(dataset)
    families = {f: members for f, members in families.items() if len(members) > 1}
    if not families:
        return []
    rule = config.claims.long_tail
    lines = [
        "## K against C",
        "",
        "The same training data scored at several K: a top-K loss spends K slots per image, "
        "so K/C sets how much of the ranking it leaves free. Test macro top-K in %; the "
        "difference with the best baseline (by mean) is paired by seed, in points.",
        "",
        "| data | K | K/C | method | macro top-K | best baseline | paired difference | collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for folder, members in families.items():
        for dataset in sorted(members, key=lambda d: d.k):
            key = f"macro_top{dataset.k}"
            ratio = dataset.k / plan.num_classes[dataset.name]
            arms = config.arms_for(dataset)
            present = [b for b in rule.baselines if b in arms]
            means = {
                b: r[f"test_{key}_mean"] for b in present if (r := row_of(rows, dataset.name, b))
            }
            means = {b: m for b, m in means.items() if not math.isnan(m)}
            best = max(means, key=lambda b: means[b]) if means else None
            for method in (m for m in rule.methods if m in arms):
                row = row_of(rows, dataset.name, method)
                diff = paired(
                    seed_values(plan, records, dataset.name, method, key),
                    seed_values(plan, records, dataset.name, best, key) if best else {},
                )
                mean = row[f"test_{key}_mean"] if row else math.nan
                lines.append(
                    f"| {folder} | {dataset.k} | {ratio:.2f} | `{method}` | "
                    f"{'n/a' if math.isnan(mean) else f'{mean * 100:.1f}'} | "
                    f"{best or 'n/a'} {'' if best is None else f'{means[best] * 100:.1f}'} | "
                    f"{diff.text()} | {row['collapsed'] if row else 0}/{row['planned'] if row else 0} |"
                )
    return lines + [""]
