"""metrics.py: F1 and precision against scikit-learn, and precision's relation to the original's."""
import numpy as np
import pytest
from sklearn import metrics as skm

from analysis.metrics import classification_scores, confusion_matrix, mean_f1

LABELS = list(range(9))


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
