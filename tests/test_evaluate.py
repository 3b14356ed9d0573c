import numpy as np
import pytest
from sklearn import metrics as skm

from evaluate import (classification_scores, class_balanced_accuracy, confusion_matrix,
                      robustness_auc)

LABELS = list(range(9))


def random_predictions(seed, n=450, drop_class=None):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 9, n)
    if drop_class is not None:
        y_true[y_true == drop_class] = (drop_class + 1) % 9
    # mostly right, with structured confusions, so every metric is non-trivial
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 9, n))
    return y_true, y_pred


@pytest.mark.parametrize("seed", range(5))
def test_confusion_matrix_matches_scikit_learn(seed):
    y_true, y_pred = random_predictions(seed)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred),
                                  skm.confusion_matrix(y_true, y_pred, labels=LABELS))


@pytest.mark.parametrize("seed,drop_class", [(0, None), (1, None), (2, 3), (3, 8)])
def test_scores_match_scikit_learn(seed, drop_class):
    y_true, y_pred = random_predictions(seed, drop_class=drop_class)
    scores = classification_scores(confusion_matrix(y_true, y_pred))
    assert scores["accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    np.testing.assert_allclose(scores["sensitivity"], skm.recall_score(
        y_true, y_pred, labels=LABELS, average=None, zero_division=0))
    np.testing.assert_allclose(scores["precision"], skm.precision_score(
        y_true, y_pred, labels=LABELS, average=None, zero_division=0))
    np.testing.assert_allclose(scores["f1"], skm.f1_score(
        y_true, y_pred, labels=LABELS, average=None, zero_division=0))
    assert scores["mean_f1"] == pytest.approx(skm.f1_score(
        y_true, y_pred, labels=LABELS, average="macro", zero_division=0))
    assert scores["Faf"] == pytest.approx(scores["f1"][1])


@pytest.mark.parametrize("seed", range(3))
def test_cpsc_subscores_equal_f1_of_the_merged_classes(seed):
    """Fblock, Fpc and Fst are the F1 of the group scored as one class (CPSC2018's rule),
    which equals the pooled 2*TP / (row sums + column sums) of SPEC section 7."""
    y_true, y_pred = random_predictions(seed)
    scores = classification_scores(confusion_matrix(y_true, y_pred))
    for name, group in {"Fblock": [2, 3, 4], "Fpc": [5, 6], "Fst": [7, 8]}.items():
        cm = confusion_matrix(y_true, y_pred)
        tp = sum(cm[i, i] for i in group)
        expected = 2 * tp / (cm[group, :].sum() + cm[:, group].sum())
        assert scores[name] == pytest.approx(expected)
    # a perfect classifier scores 1 everywhere
    perfect = classification_scores(confusion_matrix(y_true, y_true))
    assert all(perfect[k] == 1.0 for k in ("accuracy", "mean_f1", "Faf", "Fblock", "Fpc", "Fst"))


def test_class_balanced_accuracy_ignores_absent_classes():
    cm = np.zeros((9, 9), dtype=int)
    cm[0, 0], cm[0, 1], cm[1, 1] = 3, 1, 2
    assert class_balanced_accuracy(cm) == pytest.approx((0.75 + 1.0) / 2)


def test_robustness_auc_on_hand_computed_curves():
    assert robustness_auc([0, 1], [1.0, 1.0]) == pytest.approx(1.0)
    assert robustness_auc([0, 1], [1.0, 0.0]) == pytest.approx(0.5)
    # uneven levels: trapezoids 0.1*(0.9+0.8)/2 + 0.4*(0.8+0.2)/2 = 0.085 + 0.2 = 0.285, over 0.5
    assert robustness_auc([0, 0.1, 0.5], [0.9, 0.8, 0.2]) == pytest.approx(0.285 / 0.5)


@pytest.mark.parametrize("levels", [[0.1, 0.2], [0, 0.2, 0.1], [0]])
def test_robustness_auc_rejects_bad_levels(levels):
    with pytest.raises(ValueError):
        robustness_auc(levels, [0.5] * len(levels))
