"""Over-cluster, then merge: the merge against hand-checked tables, and the callback in a real
``validate``, ``test`` and ``predict`` of a model whose clusters cut each class in two."""

import csv

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aae_lightning import (AdversarialAutoencoder, CategoricalPrior, GaussianPrior, LatentCode, MergedClusters, MNISTDataModule,
                           PredictionWriter, RandomShift)
from aae_lightning.merging import merge_clusters, neighbour_joint
from conftest import write_idx_dataset


def test_merge_clusters_joins_the_clusters_that_trade_images_beyond_their_size():
    # A and B are large and trade 0.03 of the images, C and D small and trade 0.02: in raw mass
    # A-B is the likelier pair, but for their sizes C and D trade more (0.13 against 0.09)
    joint = torch.tensor([[0.32, 0.03, 0.00, 0.00],
                          [0.03, 0.32, 0.00, 0.00],
                          [0.00, 0.00, 0.13, 0.02],
                          [0.00, 0.00, 0.02, 0.13]])
    assert merge_clusters(joint, 3).tolist() == [0, 1, 2, 2]
    assert merge_clusters(joint, 2).tolist() == [0, 0, 1, 1]
    assert merge_clusters(joint, 4).tolist() == [0, 1, 2, 3]


def test_a_small_cluster_joins_the_large_cluster_it_sends_its_images_to():
    # six clusters of six digits (0.16 each) and a small second cluster of digit 0 (0.02, above a
    # tenth of an equal share, so it takes part in the agglomeration) that sends 15% of its images to
    # cluster 0; clusters 1 and 2, of two digits, trade 6% of theirs. Divided by the root of their
    # sizes the two pairs look alike (0.053 against 0.062: digits 1 and 2 would be merged, the small
    # cluster left alone); as the share of the smaller one's images that go to the other they do not
    # (0.15 against 0.062)
    joint = torch.diag(torch.tensor([0.16] * 6 + [0.02]))
    joint[0, 6] = joint[6, 0] = 0.003
    joint[6, 6] -= 0.003
    joint[0, 0] -= 0.003
    joint[1, 2] = joint[2, 1] = 0.01
    joint[1, 1] -= 0.01
    joint[2, 2] -= 0.01
    assert merge_clusters(joint, 6).tolist() == [0, 1, 2, 3, 4, 5, 0]


def test_an_empty_cluster_joins_a_group_instead_of_costing_a_merge():
    # clusters 0 / 1 and 2 / 3 hold four pure classes; cluster 4 is all but empty and trades with 3
    joint = torch.diag(torch.tensor([0.25, 0.25, 0.25, 0.2499, 0.0001]))
    joint[3, 4] = joint[4, 3] = 0.00005
    assert merge_clusters(joint, 4).tolist() == [0, 1, 2, 3, 3]


def test_a_merge_past_the_size_limit_waits_until_no_other_is_left():
    # a digit cut in two (clusters 0 and 1, a tenth each, trading a tenth of their images), two
    # digits that look alike (2 and 3, a quarter each, trading a fifth of theirs) and one more (4).
    # By share alone 2 and 3 merge first; their group would hold half the images, past 1.5 times
    # an equal share of four groups (0.375), so the split digit is joined instead
    joint = torch.tensor([[0.09, 0.01, 0.00, 0.00, 0.00],
                          [0.01, 0.09, 0.00, 0.00, 0.00],
                          [0.00, 0.00, 0.20, 0.05, 0.00],
                          [0.00, 0.00, 0.05, 0.20, 0.00],
                          [0.00, 0.00, 0.00, 0.00, 0.30]])
    assert merge_clusters(joint, 4, max_size=None).tolist() == [0, 1, 2, 2, 3]
    assert merge_clusters(joint, 4).tolist() == [0, 0, 1, 2, 3]
    # at most an equal share of three groups, every merge past the split digit's is too large: the
    # likeliest of them is taken
    assert merge_clusters(joint, 3, max_size=1.0).tolist() == [0, 0, 1, 1, 2]


def test_neighbour_joint_pairs_each_image_s_cluster_with_its_nearest_images_clusters():
    # images 0 and 1 lie together (clusters a and b), 2 and 3 together (both c), 4 a little
    # nearer 2 than 3 (cluster a); each image's one nearest other image, in cosine
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.1, 1.0], [0.0, 1.0], [0.3, 1.0]])
    probs = torch.eye(3)[[0, 1, 2, 2, 0]]
    expected = torch.tensor([[0.0, 1.0, 1.0],
                             [1.0, 0.0, 0.0],
                             [0.0, 0.0, 2.0]])
    assert torch.equal(neighbour_joint(hidden, probs, 1), expected)
    # two neighbours each: the mean of their clusters; more than the other images asks for all of them
    assert torch.allclose(neighbour_joint(hidden, probs, 2).sum(1), probs.sum(0))
    assert torch.allclose(neighbour_joint(hidden, probs, 10), neighbour_joint(hidden, probs, 4))
    # one image has no other to be its neighbour (the mean over none would be NaN)
    with pytest.raises(ValueError, match="needs another image to be its neighbour, got 1 image"):
        neighbour_joint(hidden[:1], probs[:1], 10)


def test_merge_clusters_rejects_more_groups_than_clusters():
    with pytest.raises(ValueError, match="cannot merge 4 clusters into 5"):
        merge_clusters(torch.eye(4), 5)


class ClassThenSide(nn.Module):
    """A fixed encoder whose 20 clusters are each class cut in two by which side of its class's
    mean image the ink leans to: a shift moves an image between the two halves of its class, never
    to another class."""

    def __init__(self, means: torch.Tensor, out_dim: int):
        super().__init__()
        self.register_buffer("means", means)
        self.out_dim = out_dim
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        c = torch.cdist(x.flatten(1), self.means.flatten(1)).argmin(1)
        columns = torch.arange(x.shape[-1], dtype=x.dtype)
        lean = (x.sum(dim=(1, 2)) * columns).sum(1) / x.sum(dim=(1, 2, 3)) - (self.means[c].sum(dim=(1, 2)) * columns).sum(1) / self.means[c].sum(dim=(1, 2, 3))
        logits = torch.zeros(len(x), self.out_dim)
        logits[torch.arange(len(x)), 2 * c + (lean > 0).long()] = self.scale
        return logits


def test_merged_clusters_scores_classes_that_the_clusters_cut_in_two(tmp_path):
    data = MNISTDataModule(data_dir=str(write_idx_dataset(tmp_path / "templates", n_train=1000, n_test=100, max_shift=1)),
                           val_size=300, download=False, batch_size=100)
    data.setup("fit")
    images, labels = data.splits["train"]
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    model = AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(20)), "z": LatentCode(GaussianPrior(2))}, discriminator_hidden=(8,),
                                   encoder=lambda shape, out_dim: ClassThenSide(means, out_dim), figures_every_n_epochs=0)
    merged = MergedClusters(num_clusters=10, perturbation=RandomShift(max_shift=2))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[merged])
    (val,) = trainer.validate(model, data, verbose=False)
    # each class is two clusters: the 20 cannot score above about half of each class, the 10 groups can
    assert val["val/acc"] < 0.75 and val["val/clusters_used"] > 15, val
    assert val["val/merged/acc"] > 0.98 and val["val/merged/clusters_used"] == 10, val
    # the merge drew its copies from a stream of its own: the run's random numbers are untouched
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    trainer.validate(model, data, verbose=False)
    assert torch.equal(torch.rand(3), expected)
    (test,) = trainer.test(model, data, verbose=False)
    assert test["test/merged/acc"] > 0.98
    # predict writes each image's group beside its cluster: the two halves of a class share one
    predictor = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[merged, PredictionWriter(output_dir=str(tmp_path))])
    predictor.predict(model, data, return_predictions=False)
    with (tmp_path / "predictions" / "test.csv").open() as f:
        rows = list(csv.DictReader(f))
    group_of = {}
    for row in rows:
        group_of.setdefault(int(row["cluster"]) // 2, set()).add(int(row["merged_cluster"]))
    assert len(rows) == 100 and all(len(g) == 1 for g in group_of.values()) and len(set.union(*group_of.values())) == 10, group_of
    # merged on one training image, which has no neighbour: the perturbed copy alone gives the groups
    groups = MergedClusters(num_clusters=10, perturbation=RandomShift(max_shift=2), max_images=1).fit_groups(trainer, model)
    assert groups.shape == (20,) and 0 <= groups.min() and groups.max() < 10


def test_merged_clusters_needs_more_clusters_than_groups_a_datamodule_a_positive_size_limit_and_neighbours(tmp_path):
    data = MNISTDataModule(data_dir=str(write_idx_dataset(tmp_path / "templates", n_train=200, n_test=50)), val_size=50, download=False)
    model = AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(10)), "z": LatentCode(GaussianPrior(2))}, discriminator_hidden=(8,),
                                   figures_every_n_epochs=0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[MergedClusters(num_clusters=16)])
    with pytest.raises(ValueError, match="num_clusters=16 must lie between 1 and the model's 10 clusters"):
        trainer.validate(model, data, verbose=False)
    data.setup("fit")
    loader = DataLoader(TensorDataset(*data.splits["val"]), batch_size=50)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[MergedClusters(num_clusters=5)])
    with pytest.raises(ValueError, match="needs one of aae_lightning's DataModules"):
        trainer.validate(model, loader, verbose=False)
    with pytest.raises(ValueError, match="max_size must be > 0"):
        MergedClusters(max_size=0)
    with pytest.raises(ValueError, match="neighbours must be >= 1 or null"):
        MergedClusters(neighbours=0)
