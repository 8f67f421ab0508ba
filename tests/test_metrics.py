import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from aae_lightning.metrics import ClusterMetrics, ClusterPurity, ClustersUsed, HungarianAccuracy, contingency_from_labels


def hard(clusters, labels, metric):
    metric.update(torch.tensor(clusters), torch.tensor(labels))
    return metric.compute().item()


def test_purity_and_hungarian_on_a_hand_computed_table():
    # cluster 0: labels 0,0,1 ; cluster 1: 1,1 ; cluster 2: 1,2
    clusters = [0, 0, 0, 1, 1, 2, 2]
    labels = [0, 0, 1, 1, 1, 1, 2]
    # majority: 2 + 2 + 1 (tie in cluster 2 resolved to the first label) = 5 / 7
    assert hard(clusters, labels, ClusterPurity(3, 3)) == pytest.approx(5 / 7)
    # one-to-one: 0->0 (2), 1->1 (2), 2->2 (1) = 5 / 7
    assert hard(clusters, labels, HungarianAccuracy(3, 3)) == pytest.approx(5 / 7)


def test_more_clusters_than_classes_lets_purity_exceed_hungarian():
    # K=4 > C=2: two clusters per class, all pure
    clusters = [0, 1, 2, 3, 0, 1, 2, 3]
    labels = [0, 0, 1, 1, 0, 0, 1, 1]
    assert hard(clusters, labels, ClusterPurity(4, 2)) == 1.0
    # only one cluster per class can be matched: half the examples
    assert hard(clusters, labels, HungarianAccuracy(4, 2)) == 0.5


def test_empty_clusters_take_no_part():
    clusters = [0, 0, 3, 3]
    labels = [1, 1, 0, 1]
    assert hard(clusters, labels, ClusterPurity(5, 2)) == pytest.approx(0.75)
    assert hard(clusters, labels, ClustersUsed(5, 2)) == 2
    assert hard(clusters, labels, HungarianAccuracy(5, 2)) == pytest.approx(0.75)


def test_a_single_cluster_scores_the_majority_class():
    labels = [0, 1, 1, 2, 1]
    assert hard([0] * 5, labels, ClusterPurity(1, 3)) == pytest.approx(0.6)
    assert hard([0] * 5, labels, HungarianAccuracy(1, 3)) == pytest.approx(0.6)


def test_most_confident_protocol_uses_the_label_of_the_most_confident_member():
    # cluster 0 holds three label-0 examples (low confidence) and one label-1 (very confident)
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.99, 0.01], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    confident = ClusterPurity(2, 2, protocol="most_confident")
    confident.update(probs, labels)
    majority = ClusterPurity(2, 2)
    majority.update(probs, labels)
    assert confident.compute().item() == pytest.approx(2 / 5)
    assert majority.compute().item() == pytest.approx(4 / 5)


def test_unknown_protocol_is_named():
    with pytest.raises(ValueError, match="protocol must be 'majority' or 'most_confident'"):
        ClusterPurity(3, 3, protocol="best")


def test_matches_scipy_and_sklearn_on_random_assignments():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 3000)
    clusters = np.where(rng.random(3000) < 0.7, labels + 10 * rng.integers(0, 2, 3000), rng.integers(0, 16, 3000)) % 16
    probs = torch.nn.functional.one_hot(torch.tensor(clusters), 16).float() * 0.9 + 0.1 / 16
    metrics = ClusterMetrics(16, 10, prefix="val/")
    for chunk in np.array_split(np.arange(3000), 7):  # several updates accumulate like batches
        metrics.update(probs[chunk], torch.tensor(labels[chunk]))
    out = {k: v.item() for k, v in metrics.compute().items()}

    table = contingency_from_labels(clusters, labels, 16, 10)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-table)
    assert out["val/acc"] == pytest.approx(table[rows, cols].sum() / 3000)
    assert out["val/purity"] == pytest.approx(table.max(1).sum() / 3000)
    assert out["val/nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-5)
    assert out["val/ari"] == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-5)
    assert out["val/clusters_used"] == len(np.unique(clusters))
    metrics.reset()
    assert metrics.table["purity"].counts.sum() == 0
