"""analysis/metrics.py: the confusion matrix, the scores and the CPSC sub-scores against scikit-learn,
precision's relation to the original's, and the robustness AUC."""
import numpy as np
import pytest
from sklearn import metrics as skm

from analysis.metrics import class_balanced_accuracy, classification_scores, confusion_matrix, mean_f1, robustness_auc

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


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the dropped class
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
    which equals the pooled 2*TP / (row sums + column sums) of PROTOCOL section 7."""
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


def predictions_with_gaps(seed, n=300):
    """Class 4 never predicted (present in the labels), class 7 neither present nor predicted."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([c for c in LABELS if c != 7], n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 9, n))
    y_pred[np.isin(y_pred, [4, 7])] = 0
    return y_true, y_pred


@pytest.mark.parametrize("seed", range(3))
def test_mean_f1_is_scikit_learns_macro_f1_with_zero_division_0(seed):
    """Convention: a class never predicted scores F1 = 0 (its precision is 0/0, taken as 0),
    and so does a class neither present nor predicted; the mean is over all 9 classes."""
    y_true, y_pred = predictions_with_gaps(seed)
    cm = confusion_matrix(y_true, y_pred)
    assert cm[:, 4].sum() == 0 and cm[4].sum() > 0 and cm[7].sum() == cm[:, 7].sum() == 0
    expected = skm.f1_score(y_true, y_pred, labels=LABELS, average="macro", zero_division=0)
    assert mean_f1(cm) == pytest.approx(expected)
    assert classification_scores(cm)["mean_f1"] == pytest.approx(expected)
    assert classification_scores(cm)["f1"][4] == classification_scores(cm)["f1"][7] == 0


def row_normalized_precision(cm):
    """The original code's precision, written out here: rows of N divided by their sums, then
    each diagonal entry over its column sum."""
    normalized = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    columns = normalized.sum(axis=0)
    return np.where(columns > 0, np.diag(normalized) / np.where(columns > 0, columns, 1), 0)


@pytest.mark.parametrize("seed", range(3))
def test_precision_is_scikit_learns_and_the_originals_on_a_balanced_split(seed):
    """Pins the documented definition (PROTOCOL section 7): N_ii / column sum, scikit-learn's
    precision_score; on a split with equal class counts it equals the original's
    row-normalized precision, on an unbalanced one it does not."""
    rng = np.random.default_rng(seed)
    y_true = np.repeat(LABELS, 50)  # the test split: 50 per class
    y_pred = np.where(rng.random(len(y_true)) < 0.7, y_true, rng.integers(0, 9, len(y_true)))
    precision = classification_scores(confusion_matrix(y_true, y_pred))["precision"]
    np.testing.assert_allclose(precision, skm.precision_score(y_true, y_pred, labels=LABELS, average=None,
                                                              zero_division=0))
    np.testing.assert_allclose(precision, row_normalized_precision(confusion_matrix(y_true, y_pred)))

    unbalanced = np.concatenate([y_true, np.zeros(200, int)])  # 200 more Normal records...
    predicted = np.concatenate([y_pred, np.ones(200, int)])    # ...all called AF
    cm = confusion_matrix(unbalanced, predicted)
    ours = classification_scores(cm)["precision"]
    np.testing.assert_allclose(ours, skm.precision_score(unbalanced, predicted, labels=LABELS, average=None,
                                                         zero_division=0))
    assert not np.allclose(ours[1], row_normalized_precision(cm)[1])
