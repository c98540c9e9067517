"""The verdict rules of the claims on hand-made records (5 seeds, paired by seed):
claim 1 (within 1 point of the best of CE and the SVM, and no larger drop than CE from the
clean twin) and claim 2 (a paired interval above 0 against every baseline)."""

from __future__ import annotations

import pytest

from jobs.experiment.claims import claims_section, long_tail_verdicts, noise_verdicts

SEEDS = [0, 1, 2, 3, 4]
JITTER = [0.004, -0.003, 0.001, -0.002, 0.0]  # per-seed noise, shared by the arms of a seed


def _grid(make_plan, dataset_entry, study: str):
    if study == "label_noise":
        datasets = [
            dataset_entry("clean", "label_noise"),
            dataset_entry("noisy", "label_noise", label_noise=0.5, clean="clean"),
        ]
        losses = {"cross_entropy": {}, "smooth_topk_svm": {"tau": 1.0}, "noised_topk": {}}
    else:
        datasets = [dataset_entry("lt")]
        losses = {"cross_entropy": {}, "ldam": {}, "noised_topk_imbalanced": {}}
    config = {
        "seeds": SEEDS,
        "losses": losses,
        "datasets": datasets,
        "claims": (
            {"label_noise": {"methods": ["noised_topk"]}}
            if study == "label_noise"
            else {
                "long_tail": {
                    "methods": ["noised_topk_imbalanced"],
                    "baselines": ["cross_entropy", "ldam"],
                }
            }
        ),
    }
    return make_plan(config)


def _records(plan, make_record, finals, means: dict, spread: float = 1.0) -> dict:
    """Records of the final runs: means[(dataset, arm)] + the seed's jitter x spread (a list
    of per-seed values is taken as is; None: that seed failed)."""
    records = {}
    for (dataset, arm), mean in means.items():
        for seed, run in finals(plan, dataset, arm).items():
            value = mean[seed] if isinstance(mean, list) else mean + JITTER[seed] * spread
            if value is None:
                records[run.run_id] = make_record(run, 5, status="failed")
            else:
                records[run.run_id] = make_record(run, 5, test=value, val=0.6)
    return records


def _claim1(make_plan, dataset_entry, make_record, finals, noisy: dict, clean=None, spread=1.0):
    config, plan = _grid(make_plan, dataset_entry, "label_noise")
    clean = clean or {"cross_entropy": 0.90, "smooth_topk_svm": 0.85, "noised_topk": 0.90}
    means = {("clean", arm): value for arm, value in clean.items()}
    means |= {("noisy", arm): value for arm, value in noisy.items()}
    records = _records(plan, make_record, finals, means, spread)
    by_name = {d.name: d for d in config.datasets}
    return {d: noise_verdicts(config, plan, records, by_name[d])[0] for d in ("clean", "noisy")}


def test_claim1_holds_within_a_point_and_with_no_larger_drop(
    make_plan, dataset_entry, make_record, finals
):
    clean = {"cross_entropy": 0.90, "smooth_topk_svm": 0.85, "noised_topk": 0.893}
    noisy = {"cross_entropy": 0.80, "smooth_topk_svm": 0.70, "noised_topk": 0.795}
    verdicts = _claim1(make_plan, dataset_entry, make_record, finals, noisy, clean)
    assert verdicts["clean"].held is True  # no noise: the gap alone
    assert verdicts["clean"].text == "gap to cross_entropy: -0.7 points (95% CI -0.7 to -0.7, n=5)"
    text = verdicts["noisy"].text
    assert verdicts["noisy"].held is True
    assert "gap to cross_entropy: -0.5 points (95% CI -0.5 to -0.5, n=5)" in text
    # noised_topk lost 9.8 points, cross-entropy 10: +0.2
    assert "change from clean minus cross_entropy's: +0.2 points" in text


def test_claim1_fails_beyond_a_point_or_on_a_larger_drop(
    make_plan, dataset_entry, make_record, finals
):
    clean = {"cross_entropy": 0.90, "smooth_topk_svm": 0.85, "noised_topk": 0.893}
    far = {"cross_entropy": 0.80, "smooth_topk_svm": 0.70, "noised_topk": 0.78}
    verdict = _claim1(make_plan, dataset_entry, make_record, finals, far, clean)["noisy"]
    assert verdict.held is False and "gap to cross_entropy: -2.0 points" in verdict.text
    # within a point on the noisy data, but 2 points ahead on the clean data: it lost more
    ahead = {"cross_entropy": 0.88, "smooth_topk_svm": 0.85, "noised_topk": 0.90}
    close = {"cross_entropy": 0.80, "smooth_topk_svm": 0.70, "noised_topk": 0.795}
    verdict = _claim1(make_plan, dataset_entry, make_record, finals, close, ahead)["noisy"]
    assert verdict.held is False
    assert "change from clean minus cross_entropy's: -2.5 points" in verdict.text
    # the best baseline is the one with the higher mean: here the SVM
    svm_best = {"cross_entropy": 0.70, "smooth_topk_svm": 0.80, "noised_topk": 0.795}
    verdict = _claim1(make_plan, dataset_entry, make_record, finals, svm_best, clean)["noisy"]
    assert "gap to smooth_topk_svm: -0.5 points" in verdict.text


def test_claim1_marks_a_verdict_within_seed_noise_and_needs_two_seeds(
    make_plan, dataset_entry, make_record, finals
):
    # gaps of -0.8, -2.8, +1.2, -0.3, -1.3 points: a mean of -0.8 whose interval crosses -1
    clean = {"cross_entropy": 0.90, "smooth_topk_svm": 0.85, "noised_topk": 0.88}
    wobbly = [0.792, 0.772, 0.812, 0.797, 0.787]
    noisy = {"cross_entropy": 0.80, "smooth_topk_svm": 0.70, "noised_topk": wobbly}
    verdict = _claim1(make_plan, dataset_entry, make_record, finals, noisy, clean, spread=0.0)
    assert verdict["noisy"].held is True
    assert "gap to cross_entropy: -0.8 points" in verdict["noisy"].text
    assert verdict["noisy"].text.endswith("(within seed noise: gap, change)")
    one_seed = [0.79, None, None, None, None]
    noisy = {"cross_entropy": 0.80, "smooth_topk_svm": 0.70, "noised_topk": one_seed}
    verdict = _claim1(make_plan, dataset_entry, make_record, finals, noisy, clean)["noisy"]
    assert verdict.held is None and "(n=1, no interval)" in verdict.text


def _claim2(make_plan, dataset_entry, make_record, finals, means):
    config, plan = _grid(make_plan, dataset_entry, "long_tail")
    records = _records(plan, make_record, finals, {("lt", a): m for a, m in means.items()})
    return config, plan, records, long_tail_verdicts(config, plan, records, config.datasets[0])[0]


def test_claim2_needs_every_paired_interval_above_zero(
    make_plan, dataset_entry, make_record, finals
):
    ahead = {"cross_entropy": 0.70, "ldam": 0.75, "noised_topk_imbalanced": 0.76}
    config, plan, records, verdict = _claim2(make_plan, dataset_entry, make_record, finals, ahead)
    assert verdict.held is True
    assert "closest baseline ldam: +1.0 points (95% CI +1.0 to +1.0, n=5)" in verdict.text
    assert "beaten (interval above 0) by 2 of 2" in verdict.text
    page = "\n".join(claims_section(config, plan, records))
    assert "| 2 | lt | `noised_topk_imbalanced` | **held** |" in page

    # ahead of LDAM on the mean only: its seeds scatter, the interval crosses 0
    scattered = [0.76, 0.74, 0.77, 0.735, 0.755]
    close = {"cross_entropy": 0.70, "ldam": 0.75, "noised_topk_imbalanced": scattered}
    verdict = _claim2(make_plan, dataset_entry, make_record, finals, close)[3]
    assert verdict.held is False and "beaten (interval above 0) by 1 of 2" in verdict.text
    behind = {"cross_entropy": 0.70, "ldam": 0.80, "noised_topk_imbalanced": 0.75}
    verdict = _claim2(make_plan, dataset_entry, make_record, finals, behind)[3]
    assert verdict.held is False and "worse beyond seed noise than ldam" in verdict.text


def test_claim2_leaves_failed_seeds_out_and_needs_two_pairs(
    make_plan, dataset_entry, make_record, finals
):
    failed = [0.76, None, None, None, 0.77]
    means = {"cross_entropy": 0.70, "ldam": 0.72, "noised_topk_imbalanced": failed}
    verdict = _claim2(make_plan, dataset_entry, make_record, finals, means)[3]
    # two pairs (seeds 0 and 4) of +3.6 and +5.0 points: t(0.975, 1) = 12.7 spreads the
    # interval far below 0
    assert "+4.3 points (95% CI -4.6 to +13.2, n=2)" in verdict.text and verdict.held is False
    alone = {"cross_entropy": 0.70, "ldam": 0.72, "noised_topk_imbalanced": [0.8] + [None] * 4}
    verdict = _claim2(make_plan, dataset_entry, make_record, finals, alone)[3]
    assert verdict.held is None and "fewer than 2 paired seeds" in verdict.text


@pytest.mark.parametrize("study", ["label_noise", "long_tail"])
def test_a_missing_arm_is_not_measured(make_plan, dataset_entry, make_record, finals, study):
    config, plan = _grid(make_plan, dataset_entry, study)
    page = "\n".join(claims_section(config, plan, {}))
    assert "not measured" in page and "**held**" not in page


def test_claim2_judges_the_baselines_it_can_pair_and_names_the_others(
    make_plan, dataset_entry, make_record, finals
):
    """A baseline whose runs failed (fewer than 2 seeds to pair) is named, not judged; the claim
    still fails on a baseline it could be paired with, and cannot hold with one unjudged."""
    ldam_failed = [0.9, None, None, None, None]
    behind = {"cross_entropy": 0.80, "ldam": ldam_failed, "noised_topk_imbalanced": 0.75}
    verdict = _claim2(make_plan, dataset_entry, make_record, finals, behind)[3]
    assert verdict.held is False
    assert "beaten (interval above 0) by 0 of 1" in verdict.text
    assert "not judged (fewer than 2 paired seeds): ldam" in verdict.text
    ahead = {"cross_entropy": 0.70, "ldam": ldam_failed, "noised_topk_imbalanced": 0.75}
    verdict = _claim2(make_plan, dataset_entry, make_record, finals, ahead)[3]
    assert verdict.held is None and "beaten (interval above 0) by 1 of 1" in verdict.text
