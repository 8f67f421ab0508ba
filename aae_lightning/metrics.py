"""Clustering metrics over a K x C contingency table (clusters x true classes).

The table is a sum-reduced torchmetrics state, so under DDP every process's counts are added
before the metric is computed, never averaged.
"""

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.clustering import AdjustedRandScore, NormalizedMutualInfoScore


class _ContingencyMetric(Metric):
    """Accumulates counts[k, c] (cluster k, class c) and, per cell, the highest cluster
    confidence of any example seen there (for the paper's most-confident-example protocol)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_clusters: int, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        if num_clusters < 1 or num_classes < 1:
            raise ValueError(f"need num_clusters >= 1 and num_classes >= 1, got {num_clusters} and {num_classes}")
        self.num_clusters, self.num_classes = num_clusters, num_classes
        self.add_state("counts", torch.zeros(num_clusters, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("best_confidence", torch.full((num_clusters, num_classes), -1.0), dist_reduce_fx="max")

    def update(self, cluster_probs: torch.Tensor, target: torch.Tensor) -> None:
        """``cluster_probs``: (N, K) soft assignments, or (N,) hard cluster indices; ``target``: (N,) labels."""
        if cluster_probs.ndim == 2:
            confidence, clusters = cluster_probs.max(dim=1)
        else:
            clusters, confidence = cluster_probs.long(), torch.ones(len(cluster_probs), device=cluster_probs.device)
        cell = clusters * self.num_classes + target.long()
        size = self.num_clusters * self.num_classes
        # out of place: states reset under validate's inference mode must still update in fit
        self.counts = self.counts + torch.bincount(cell, minlength=size).view_as(self.counts)
        best = torch.full((size,), -1.0, device=confidence.device).scatter_reduce(0, cell, confidence.float(), "amax")
        self.best_confidence = torch.maximum(self.best_confidence, best.view_as(self.best_confidence))


class ClusterPurity(_ContingencyMetric):
    """Many-to-one accuracy: each cluster is assigned one label and every member is scored by it.

    ``protocol="majority"`` gives each cluster its most frequent label (the usual "purity");
    ``protocol="most_confident"`` gives it the label of its most confident example, as in the
    paper (sec. 6). Empty clusters take no part.
    """

    def __init__(self, num_clusters: int, num_classes: int, protocol: Literal["majority", "most_confident"] = "majority", **kwargs):
        super().__init__(num_clusters, num_classes, **kwargs)
        if protocol not in ("majority", "most_confident"):
            raise ValueError(f"ClusterPurity: protocol must be 'majority' or 'most_confident', got {protocol!r}")
        self.protocol = protocol

    def compute(self) -> torch.Tensor:
        total = self.counts.sum()
        if total == 0:
            return torch.tensor(0.0)
        source = self.counts if self.protocol == "majority" else self.best_confidence
        label = source.argmax(dim=1)
        correct = self.counts.gather(1, label[:, None]).sum()
        return correct.float() / total


class HungarianAccuracy(_ContingencyMetric):
    """One-to-one accuracy: the best matching of clusters to classes (``linear_sum_assignment`` on
    the rectangular table); members of unmatched clusters count as errors."""

    def compute(self) -> torch.Tensor:
        counts = self.counts.cpu().numpy()
        if counts.sum() == 0:
            return torch.tensor(0.0)
        rows, cols = linear_sum_assignment(counts, maximize=True)
        return torch.tensor(float(counts[rows, cols].sum() / counts.sum()))


class ClustersUsed(_ContingencyMetric):
    """How many clusters received at least one example."""

    higher_is_better = None

    def compute(self) -> torch.Tensor:
        return (self.counts.sum(dim=1) > 0).sum().float()


def contingency_from_labels(clusters: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """The K x C table of two label arrays (for tests and benchmarks)."""
    table = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return table


class ClusterMetrics(nn.Module):
    """Everything logged about a categorical code against the true labels, under one prefix:
    purity (majority and most-confident), Hungarian ``acc``, ``clusters_used``, ``nmi``, ``ari``."""

    def __init__(self, num_clusters: int, num_classes: int, prefix: str):
        super().__init__()
        # the four table metrics share one state through torchmetrics' compute groups
        self.table = MetricCollection(
            {
                "purity": ClusterPurity(num_clusters, num_classes),
                "purity_confident": ClusterPurity(num_clusters, num_classes, protocol="most_confident"),
                "acc": HungarianAccuracy(num_clusters, num_classes),
                "clusters_used": ClustersUsed(num_clusters, num_classes),
            },
            prefix=prefix,
        )
        self.agreement = MetricCollection({"nmi": NormalizedMutualInfoScore(), "ari": AdjustedRandScore()}, prefix=prefix)

    def update(self, cluster_probs: torch.Tensor, target: torch.Tensor) -> None:
        self.table.update(cluster_probs, target)
        self.agreement.update(cluster_probs.argmax(dim=1), target)

    def compute(self) -> dict[str, torch.Tensor]:
        return {**self.table.compute(), **self.agreement.compute()}

    def reset(self) -> None:
        self.table.reset()
        self.agreement.reset()
