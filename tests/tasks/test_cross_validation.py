"""Intervals, folds, calibration and the paired test, on generated numbers with known answers."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from tasks.cross_validation import (
    CrossValidated,
    apply_temperature,
    cross_fitted_calibration,
    fit_temperature,
    group_ids,
    grouped_folds,
    paired_comparison,
)
from tasks.evaluation import (
    accuracy_interval,
    calibration_noise_floor,
    classification_metrics,
    expected_calibration_error,
    format_accuracy,
)
from workflows.train.cross_validate import AUTO_MAX_IMAGES, folds_for


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval from its formula (Wilson, 1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(28, 28), (426, 467), (0, 10), (5, 9)])
def test_the_interval_is_wilsons(k, n):
    assert accuracy_interval(k, n) == pytest.approx(_wilson(k, n), abs=1e-6)
    assert accuracy_interval(0, 0) is None


def test_28_of_28_is_consistent_with_088():
    low, high = accuracy_interval(28, 28)
    assert 0.87 < low < 0.89 and high == pytest.approx(1.0)


def test_the_interval_covers_a_known_binomial_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for p, n in ((0.9, 100), (0.75, 467), (0.97, 60)):
        draws = rng.binomial(n, p, size=3000)
        covered = np.mean([low <= p <= high for low, high in
                           (accuracy_interval(int(k), n) for k in draws)])  # fmt: skip
        assert 0.93 <= covered <= 0.975, (p, n, covered)


def test_metrics_carry_the_count_and_interval_and_the_report_shows_them():
    labels = np.array([0] * 50 + [1] * 50)
    probs = np.tile([[0.8, 0.2]], (100, 1))  # says 0 everywhere: half right
    metrics = classification_metrics(labels, probs, ("a", "b"))
    assert metrics["n"] == 100 and metrics["accuracy"] == 0.5
    assert metrics["accuracy_interval"] == pytest.approx(_wilson(50, 100), abs=1e-6)
    assert format_accuracy(0.912, (0.885, 0.934), 467) == "0.912 (0.885-0.934, n=467)"
    assert format_accuracy(None) == "-"


def test_folds_keep_every_duplicate_group_together_and_stratify():
    labels = np.repeat([0, 1, 2], [60, 40, 20])
    groups = [[i, i + 1, i + 2] for i in range(0, 60, 6)] + [[70, 71], [100, 101, 102, 103]]
    folds = grouped_folds(labels, group_ids(len(labels), groups), 5, seed=3)
    assert set(folds) == set(range(5))
    for members in groups:
        assert len(set(folds[members])) == 1, members
    for label, count in ((0, 60), (1, 40), (2, 20)):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.min() >= count / 5 - 3 and per_fold.max() <= count / 5 + 3
    again = grouped_folds(labels, group_ids(len(labels), groups), 5, seed=3)
    assert (folds == again).all()  # the same folds for the same seed


def test_the_default_folds():
    assert folds_for(90, 30, None) == 5
    assert folds_for(AUTO_MAX_IMAGES + 1, 500, None) == 0  # large: one split is a fair witness
    assert folds_for(AUTO_MAX_IMAGES + 1, 500, 3) == 3
    assert folds_for(40, 3, None) == 3  # each fold needs an image of every class
    assert folds_for(40, 1, 5) == 0 and folds_for(90, 30, 0) == 0


def _overconfident(n: int, seed: int, sharpen: float = 3.0):
    """Labels drawn from sigmoid(z), and a model that says sigmoid(3 z): too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    said = 1 / (1 + np.exp(-sharpen * z))
    return labels, np.stack([1 - said, said], axis=1)


def test_a_temperature_fitted_on_an_overconfident_model_undoes_it():
    labels, probs = _overconfident(4000, 0)
    temperature = fit_temperature(labels, probs)
    assert temperature == pytest.approx(3.0, rel=0.12)
    before = expected_calibration_error(labels, probs)
    folds = np.arange(len(labels)) % 5
    after = expected_calibration_error(labels, cross_fitted_calibration(labels, probs, folds))
    assert before > 0.08 and after < 0.03, (before, after)
    # The same model with its logits divided by T: sigmoid(3z / 3) is the truth again.
    truth = 1 / (1 + np.exp(-np.log(probs[:, 1] / probs[:, 0]) / 3.0))
    assert apply_temperature(probs, 3.0)[:, 1] == pytest.approx(truth, abs=1e-9)
    # Softmax outputs: dividing the logits is the same as apply_temperature.
    logits = np.random.default_rng(2).normal(0, 2, (50, 4))
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scaled = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    assert apply_temperature(soft, 2.0) == pytest.approx(scaled, abs=1e-9)


def test_the_noise_floor_is_the_ece_of_a_calibrated_model_on_as_many_images():
    # Confidence 0.5 everywhere: one bin, ECE = |k/n - 1/2| with k ~ Binomial(n, 1/2), whose
    # mean is about sqrt(2 / pi) / (2 sqrt(n)).
    half = np.full((400, 2), 0.5)
    assert calibration_noise_floor(half, draws=4000) == pytest.approx(
        math.sqrt(2 / math.pi) / (2 * math.sqrt(400)), rel=0.05
    )
    assert calibration_noise_floor(np.array([[1.0, 0.0]] * 50)) == 0.0  # sure and right
    # A model calibrated by construction scores about its floor, and the floor falls with n.
    labels, probs = _overconfident(4000, 3)
    calibrated = apply_temperature(probs, 3.0)
    floor = calibration_noise_floor(calibrated)
    assert expected_calibration_error(labels, calibrated) < 2.5 * floor
    assert calibration_noise_floor(calibrated[:250]) > 2 * floor


def test_calibration_leaves_the_predicted_class_alone_and_records_it():
    labels, probs = _overconfident(600, 4)
    folds = np.arange(600) % 5
    found = CrossValidated.measure(labels, probs, folds, groups=2)
    assert found.accuracy == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-6)
    assert found.interval[0] < found.accuracy < found.interval[1] and found.n == 600
    assert len(found.per_fold) == 5 and found.ece_after < found.ece_before
    written = found.metrics()
    assert written["cv"]["folds"] == 5 and written["cv"]["duplicate_groups"] == 2
    assert written["ece"]["bins"] == 15 and written["temperature"] > 1.5
    assert 0 < written["ece"]["floor"] < written["ece"]["before"]
    calibrated = apply_temperature(probs, found.temperature)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()


def test_the_paired_test_is_mcnemars():
    labels = np.zeros(100, np.int64)
    right, wrong = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    first = np.array([right] * 80 + [right] * 12 + [wrong] * 8)
    second = np.array([right] * 80 + [wrong] * 12 + [right] * 2 + [wrong] * 6)
    found = paired_comparison(labels, first, second)
    assert (found["only_first"], found["only_second"]) == (12, 2)
    assert found["p_value"] == pytest.approx(binomtest(12, 14).pvalue, abs=1e-6)
    assert found["within_noise"] is False
    close = paired_comparison(labels, first, first)
    assert close["p_value"] == 1.0 and close["within_noise"] is True


def test_abstention_thresholds_decline_the_stated_share_of_held_out_images():
    from tasks.abstention import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Abstention, choose

    rng = np.random.default_rng(5)
    confidence = rng.uniform(0.5, 1.0, 1000)
    distance = rng.uniform(0.0, 0.3, 1000)
    probs = np.stack([confidence, 1 - confidence], axis=1)
    chosen = choose(confidence, distance, 0.05, "out-of-fold")
    decided = chosen.decide(probs, distance)
    declined = [reason for abstained, reason in decided if abstained]
    assert len(declined) == 50  # 5% of 1000, half of it by distance
    assert 20 <= declined.count(OUT_OF_DISTRIBUTION) <= 30
    assert declined.count(LOW_CONFIDENCE) == 50 - declined.count(OUT_OF_DISTRIBUTION)
    assert Abstention.from_json(chosen.to_json()) == chosen
    # Far beyond everything held out: declined whatever its confidence.
    (far,) = chosen.decide(np.array([[0.999, 0.001]]), np.array([0.9]))
    assert far == (True, OUT_OF_DISTRIBUTION)
    only_confidence = choose(confidence, None, 0.1, "validation")
    assert only_confidence.max_distance is None
    assert sum(a for a, _ in only_confidence.decide(probs, None)) == 100


def test_the_prediction_interval_holds_a_new_sets_accuracy_about_95_percent_of_the_time():
    from tasks.cross_validation import prediction_interval

    rng = np.random.default_rng(7)
    for p, n, m in ((0.9, 2400, 235), (0.99, 2400, 400), (0.8, 300, 60)):
        known = rng.binomial(n, p, 2000)
        new = rng.binomial(m, p, 2000) / m
        inside = [low <= a <= high for k, a in zip(known, new, strict=True)
                  for low, high in [prediction_interval(int(k), n, m)]]  # fmt: skip
        assert 0.93 <= np.mean(inside) <= 0.995, (p, n, m, np.mean(inside))
        low, high = prediction_interval(int(p * n), n, m)
        ci_low, ci_high = accuracy_interval(int(p * n), n)
        assert low < ci_low and high >= ci_high  # wider: the new set's noise is in it
    assert prediction_interval(28, 28, 28)[0] < 1.0 and prediction_interval(5, 0, 10) is None


def test_evaluate_says_whether_a_measured_accuracy_is_what_cross_validation_expected():
    from tasks.cross_validation import expected_accuracy, prediction_interval

    cv = {"accuracy": 0.9, "n": 2400, "interval": [0.888, 0.912]}
    inside = expected_accuracy(cv, 0.92, 235)  # outside the CI, inside the prediction interval
    assert inside["interval"] == list(prediction_interval(2160, 2400, 235)) and inside["within"]
    assert inside["n"] == 235 and inside["cv_n"] == 2400 and inside["accuracy"] == 0.9
    assert not expected_accuracy(cv, 0.80, 235)["within"]  # far below: a warning, not noise
    small = expected_accuracy(cv, 0.92, 20)["interval"]
    assert small[1] - small[0] > inside["interval"][1] - inside["interval"][0]  # fewer: wider
    assert expected_accuracy(None, 0.9, 100) is None  # trained without --cv
    assert expected_accuracy(cv, 0.9, 0) is None and expected_accuracy(cv, None, 10) is None


def _one_hot_scores(labels: np.ndarray, right: np.ndarray, classes: int = 2) -> np.ndarray:
    """Probabilities that pick the label where ``right``, the next class elsewhere."""
    picked = np.where(right, labels, (labels + 1) % classes)
    probs = np.full((len(labels), classes), 0.2 / (classes - 1))
    probs[np.arange(len(labels)), picked] = 0.8
    return probs


def test_validation_images_that_score_apart_from_training_ones_carry_the_prediction():
    from tasks.cross_validation import CrossValidated, fit_temperature, split_agreement

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 1500)
    splits = np.array(["train"] * 1200 + ["validation"] * 300)
    folds = np.arange(1500) % 5
    # Training images right 90% of the time, validation images 75%: a harder folder.
    right = np.r_[rng.random(1200) < 0.90, rng.random(300) < 0.75]
    probs = _one_hot_scores(labels, right)
    found = split_agreement(labels, probs, splits, folds)
    train, validation = found["by_split"]["train"], found["by_split"]["validation"]
    assert (train["n"], validation["n"]) == (1200, 300)
    assert train["correct"] == right[:1200].sum() and validation["correct"] == right[1200:].sum()
    assert found["differs"] and found["p_value"] < 0.001 and found["rests_on_validation"]
    measured = CrossValidated.measure(labels, probs, folds, expected_n=300, splits=splits)
    cv = measured.metrics()["cv"]
    assert cv["splits"] == found and cv["prediction_from"] == "validation"
    low, high = cv["prediction_interval"]  # around the validation's 0.75, not the pooled 0.87
    assert low < validation["accuracy"] < high < cv["accuracy"]
    # The abstention thresholds and the temperature too are fitted on the validation images
    # alone: 0.8 is underconfident where 90% are right, overconfident where 75% are.
    assert measured.abstain["chosen_on"] == "out-of-fold validation"
    assert measured.abstain["n"] == 300
    assert measured.temperature == round(fit_temperature(labels[1200:], probs[1200:]), 6) > 1
    assert fit_temperature(labels, probs) < 1 and measured.metrics()["ece"]["on"] == (
        "out-of-fold validation"
    )
    # The same folder mix scoring alike: the pooled images carry it, narrower.
    alike = np.r_[right[:1200], rng.random(300) < 0.90]
    same = CrossValidated.measure(labels, _one_hot_scores(labels, alike), folds, expected_n=300,
                                  splits=splits).metrics()["cv"]  # fmt: skip
    assert not same["splits"]["differs"] and same["prediction_from"] == "all"
    assert CrossValidated.measure(labels, probs, folds).abstain["n"] == 1500  # no splits: all
    assert same["prediction_interval"][0] <= same["accuracy"] <= same["prediction_interval"][1]
    # An easier validation folder, too few validation images, or all of them in one fold:
    # the numbers stay pooled (the temperature is no longer pushed to a bound by a few images).
    easier = _one_hot_scores(labels, np.r_[right[:1200], np.ones(300, bool)])
    few = np.array(["train"] * 1460 + ["validation"] * 40)
    one_fold = np.where(folds == 0, "validation", "train")
    harder = _one_hot_scores(labels, np.where(one_fold == "validation", rng.random(1500) < 0.6,
                                              right))  # fmt: skip
    for probs_, splits_ in ((easier, splits), (probs, few), (harder, one_fold)):
        pooled = CrossValidated.measure(labels, probs_, folds, expected_n=300, splits=splits_)
        cv_ = pooled.metrics()["cv"]
        assert cv_["splits"]["differs"] and not cv_["splits"]["rests_on_validation"], cv_["splits"]
        assert cv_["prediction_from"] == "all" and pooled.abstain["n"] == 1500
        assert pooled.temperature == round(fit_temperature(labels, probs_), 6)
    # One split only (no validation folder): nothing to compare.
    assert split_agreement(labels, probs, np.array(["train"] * 1500), folds) is None
    alone = CrossValidated.measure(labels, probs, folds, expected_n=300,
                                   splits=np.array(["train"] * 1500)).metrics()["cv"]  # fmt: skip
    assert "splits" not in alone and alone["prediction_from"] == "all"
    # wf evaluate checks a measured accuracy against the same basis.
    from tasks.cross_validation import expected_accuracy

    expected = expected_accuracy(cv, 0.74, 300)
    assert expected["from"] == "validation" and expected["cv_n"] == 300 and expected["within"]
    assert expected["interval"] == cv["prediction_interval"]
    assert not expected_accuracy({**cv, "splits": None}, 0.74, 300)["within"]  # pooled: outside


def _scored(labels: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two-class probabilities sure when right (0.9 on the label), unsure when wrong (0.6 on
    the other class)."""
    p_label = np.where(right, 0.9, 0.4)
    probs = np.zeros((len(labels), 2))
    probs[np.arange(len(labels)), labels] = p_label
    probs[np.arange(len(labels)), 1 - labels] = 1 - p_label
    return probs


def test_the_average_of_methods_that_err_apart_beats_the_best_beyond_noise():
    from workflows.train.cross_validate import dataset_choice
    from workflows.train.summary import _ensemble_text

    rng = np.random.default_rng(0)
    n = 600
    labels, folds = rng.integers(0, 2, n), np.arange(n) % 5
    keys = [("train", f"{i}.jpg") for i in range(n)]
    truth = dict(zip(keys, labels.tolist(), strict=True))
    first, second = rng.random(n) < 0.8, rng.random(n) < 0.78  # errors apart
    for other, beats in ((second, True), (first, False)):  # then a copy of the first
        probs = {"d/bottleneck": _scored(labels, first), "d/fusion": _scored(labels, other)}
        found = {key: CrossValidated.measure(labels, p, folds) for key, p in probs.items()}
        scored = {key: dict(zip(keys, p, strict=True)) for key, p in probs.items()}
        calibrated = {key: dict(zip(keys, cross_fitted_calibration(labels, p, folds),
                                    strict=True)) for key, p in probs.items()}  # fmt: skip
        chosen = dataset_choice(found, scored, calibrated, truth, 1.0)
        ensemble = chosen["d/fusion"].choice["ensemble"]
        assert ensemble == chosen["d/bottleneck"].choice["ensemble"]
        assert ensemble["members"][0] == chosen["d/fusion"].choice["chosen"] == "bottleneck"
        assert ensemble["n"] == n and ensemble["beats_best"] is beats
        if beats:  # right wherever either is: 1 - 0.2 x 0.22
            assert ensemble["accuracy"] > 0.93 and ensemble["p_value"] < 1e-6
            assert ensemble["only_best"] == 0 and "beyond noise" in _ensemble_text(ensemble)
        else:
            assert ensemble["only_ensemble"] == ensemble["only_best"] == 0
            assert ensemble["accuracy"] == found["d/bottleneck"].accuracy
            assert "one model is enough" in _ensemble_text(ensemble)
