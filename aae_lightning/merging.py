"""Over-cluster, then merge: a model's K clusters grouped into fewer, without labels.

With as many clusters as classes, two digits that share a cluster force another digit to split,
and nothing in the training terms undoes that; with more clusters than classes each one is purer
(MNIST sample: K = 10 accuracy 0.83, K = 16 purity 0.95). Clusters of one digit trade images under
a small affine map far more often than clusters of two digits do, so the joint distribution of the
cluster of an image and of its perturbed copy (the table IIC's term maximises the information of)
says which clusters to merge. Two look-alike digits trade images under such a map too (3s and 5s);
the clusters of an image's nearest neighbours in the encoder's hidden layer are a second opinion,
and the merge reads both.
"""

import itertools

import lightning as L
import torch
import torch.nn.functional as F

from aae_lightning.callbacks import figure_rng
from aae_lightning.data import require_image_datamodule
from aae_lightning.metrics import ClusterMetrics
from aae_lightning.perturbations import Perturbation, RandomAffine


def merge_clusters(joint: torch.Tensor, num_groups: int, max_size: float | None = 1.5) -> torch.Tensor:
    """The group (0 .. num_groups - 1) of each of K clusters, from their K x K joint ``P(y, y')``
    over images and their perturbed copies: average-linkage agglomeration on the affinity
    ``P(a, b) / min(P(a), P(b))``, the share of the smaller cluster's images that go to the other.
    It does not favour merging the largest clusters, nor pass over a small cluster of a digit whose
    images go to a large one (``P(a, b) / sqrt(P(a) P(b))`` shrinks by the root of their sizes'
    ratio, and left such a cluster alone at the cost of a merge of two digits). A cluster
    holding less than a tenth of an equal share is left out of the agglomeration (nothing says
    where it belongs, and leaving it alone would cost a merge of two real ones) and joins the
    group it trades most with.

    A merge that would give a group more than ``max_size`` times an equal share of the images
    (``1 / num_groups``) waits until no other merge is left: two digits that look alike (7s and
    9s) trade images under a small map too, and their group would hold two classes' worth, while
    the training priors ask for clusters of equal size. None lets groups grow freely (classes of
    very unequal sizes)."""
    k = joint.shape[0]
    if not 1 <= num_groups <= k:
        raise ValueError(f"MergedClusters: cannot merge {k} clusters into {num_groups}")
    joint = (joint + joint.T).double()
    joint = joint / joint.sum()
    mass = joint.sum(1)
    large = mass >= 0.1 / k
    used = large.nonzero().squeeze(1)
    affinity = joint / torch.minimum(mass[:, None], mass[None, :])
    limit = float("inf") if max_size is None else max_size / num_groups
    # kept in order of their first cluster, so the groups are numbered that way
    members = [[c] for c in used.tolist()]

    def preference(pair):
        a, b = members[pair[0]], members[pair[1]]
        return float(mass[a + b].sum()) <= limit, float(affinity[a][:, b].mean())

    while len(members) > num_groups:
        i, j = max(itertools.combinations(range(len(members)), 2), key=preference)
        members[i] += members.pop(j)
    groups = torch.zeros(k, dtype=torch.long)
    for g, clusters in enumerate(members):
        groups[clusters] = g
    for c in (~large).nonzero().squeeze(1):
        groups[c] = groups[used[joint[c, used].argmax()]] if len(used) else 0
    return groups


def neighbour_joint(hidden: torch.Tensor, probs: torch.Tensor, neighbours: int) -> torch.Tensor:
    """The K x K joint of the cluster of an image and of its ``neighbours`` nearest other images
    (cosine in ``hidden``): the sum over images of q(y|x) times the mean q(y'|n) of its neighbours,
    in blocks of rows so that the N x N similarity is never held whole. Needs two images or more."""
    if len(hidden) < 2:
        raise ValueError(f"neighbour_joint: an image needs another image to be its neighbour, got {len(hidden)} image(s)")
    features = F.normalize(hidden.float(), dim=1)
    neighbours = min(neighbours, len(features) - 1)
    joint = probs.new_zeros(probs.shape[1], probs.shape[1])
    for start in range(0, len(features), 500):
        rows = torch.arange(start, min(start + 500, len(features)), device=features.device)
        similarity = features[rows] @ features.T
        similarity[torch.arange(len(rows)), rows] = float("-inf")
        nearest = similarity.topk(neighbours, dim=1).indices
        joint += probs[rows].T @ probs[nearest].mean(1)
    return joint


class MergedClusters(L.Callback):
    """Logs ``{val,test}/merged/{purity,acc,nmi,...}``: the model's cluster code merged into
    ``num_clusters`` groups by :func:`merge_clusters`, scored like the clusters themselves.

    The groups are recomputed at each validation and test epoch from the DataModule's training
    images (the first ``max_images``; their labels are not read) and one ``perturbation`` of each,
    encoded with the weights being evaluated (the weight average, where there is one). The draws
    come from a seeded stream of their own, so they never change the run's random numbers.

    Args:
        num_clusters: the groups, e.g. 10 for one per digit over a model of 30 clusters.
        perturbation: the copy the clusters trade images under, one that needs no gradient
            (``RandomAffine``, the default and the digit configs' consistency map, or ``RandomShift``).
        max_images: training images the joint is estimated on (2,000 served 16 and 30 clusters).
        max_size: a group grows past this many times an equal share of the images only when no
            other merge is left (:func:`merge_clusters`); None for classes of very unequal sizes.
        neighbours: the joint also counts how each image's cluster meets those of its this many
            nearest training images in the encoder's last hidden layer (:func:`neighbour_joint`;
            the features ``NeighbourAgreement`` trains with), each table as a distribution, so the
            two signals weigh equally. Two digits can trade images under an affine map (3s and 5s)
            and still sit apart among the neighbours. None: the perturbed copies alone.
    """

    def __init__(self, num_clusters: int = 10, perturbation: Perturbation | None = None, max_images: int = 10000,
                 max_size: float | None = 1.5, neighbours: int | None = 10):
        if max_size is not None and max_size <= 0:
            raise ValueError(f"MergedClusters: max_size must be > 0 (times an equal share of the images) or null, got {max_size}")
        if neighbours is not None and neighbours < 1:
            raise ValueError(f"MergedClusters: neighbours must be >= 1 or null, got {neighbours}")
        self.num_clusters = num_clusters
        self.max_size = max_size
        self.neighbours = neighbours
        self.perturbation = perturbation if perturbation is not None else RandomAffine()
        self.max_images = max_images
        self.groups: torch.Tensor | None = None
        self.metrics: dict[str, ClusterMetrics] = {}

    def setup(self, trainer, pl_module, stage):
        if pl_module.cluster_code is None:
            raise ValueError("MergedClusters: the model has no cluster code to merge (set codes with a CategoricalPrior)")
        k = pl_module.code_dim(pl_module.cluster_code)
        if not 1 <= self.num_clusters <= k:
            raise ValueError(f"MergedClusters: num_clusters={self.num_clusters} must lie between 1 and the model's {k} clusters")
        require_image_datamodule(trainer, "MergedClusters")
        # without labels there is nothing to score; predict still writes the groups
        self.metrics = {s: ClusterMetrics(self.num_clusters, pl_module.num_classes, f"{s}/merged/").to(pl_module.device)
                        for s in ("val", "test") if pl_module.num_classes > 0}

    @staticmethod
    def of(trainer) -> "MergedClusters | None":
        """The trainer's MergedClusters callback, if it has one."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, MergedClusters)), None)

    @torch.no_grad()
    def fit_groups(self, trainer, pl_module) -> torch.Tensor:
        images = trainer.datamodule.training_images(self.max_images)
        code = pl_module.cluster_code
        # a single image has no neighbour: the perturbed copy alone
        use_neighbours = self.neighbours is not None and len(images) > 1
        joint, hidden, probs = 0, [], []
        with figure_rng():
            for x in images.split(500):
                x = x.to(pl_module.device)
                features, codes = pl_module.encode_with_features(x)
                copies = pl_module.encode(self.perturbation(x, lambda v: pl_module.encode(v)[code]))[code]
                joint = joint + codes[code].T @ copies
                if use_neighbours:
                    hidden.append(features)
                    probs.append(codes[code])
        joint = joint.float()
        if use_neighbours:
            neighbours = neighbour_joint(torch.cat(hidden), torch.cat(probs).float(), self.neighbours)
            joint = joint / joint.sum() + neighbours / neighbours.sum()
        return merge_clusters(joint.cpu(), self.num_clusters, self.max_size).to(pl_module.device)

    def _update(self, trainer, pl_module, outputs, stage):
        if stage not in self.metrics:
            return
        if self.groups is None:
            # at the first batch, not at epoch start: by then the weight average is swapped in,
            # whatever the order of the callbacks
            self.groups = self.fit_groups(trainer, pl_module)
        probs = outputs["codes"][pl_module.cluster_code].float()
        merged = torch.zeros(len(probs), self.num_clusters, device=probs.device).index_add_(1, self.groups, probs)
        self.metrics[stage].update(merged, outputs["labels"])

    def _log(self, pl_module, stage):
        if self.groups is not None:
            pl_module.log_dict(self.metrics[stage].compute())
            self.metrics[stage].reset()
        self.groups = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, pl_module, outputs, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, pl_module, outputs, "test")

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._log(pl_module, "test")
