"""Refilling an empty cluster: 2-means and the row surgery against hand-checked cases, and the
callback in a real ``fit`` of a model whose one cluster holds two classes while another is empty."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aae_lightning import (AdversarialAutoencoder, CategoricalPrior, ClusterSplit, EMAWeights, GaussianPrior, LatentCode, MNISTDataModule,
                           NeighbourAgreement)
from aae_lightning.splitting import decoder_input_layer, split_rows, two_means
from conftest import write_idx_dataset


def test_two_means_finds_two_blobs_without_random_numbers():
    gen = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(30, 5, generator=gen), torch.randn(50, 5, generator=gen) + torch.tensor([6.0, 0, 0, 0, 0])])
    torch.manual_seed(0)
    expected = torch.rand(2)
    side = two_means(blobs)
    assert side[:30].all() != side[30:].all() and side[:30].unique().numel() == 1 and side[30:].unique().numel() == 1
    torch.manual_seed(0)
    assert torch.equal(torch.rand(2), expected)


def test_split_rows_puts_the_boundary_halfway_between_the_centres():
    layer = nn.Linear(3, 4)
    before = layer.weight.detach().clone(), layer.bias.detach().clone()
    kept, moved = torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 2, 0])
    split_rows(layer, source=1, target=3, kept=kept, moved=moved, margin=2.0)
    with torch.no_grad():
        gap = lambda h: float(layer(h)[3] - layer(h)[1])  # noqa: E731
        assert gap(moved) == pytest.approx(2.0) and gap(kept) == pytest.approx(-2.0) and gap((kept + moved) / 2) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(layer.weight[:3], before[0][:3]) and torch.equal(layer.bias[:3], before[1][:3])


class NearestClass(nn.Module):
    """Hidden features: the one-hot of the nearest class mean image."""

    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.flatten(1))

    def forward(self, x):
        return nn.functional.one_hot(torch.cdist(x.flatten(1), self.means).argmin(1), len(self.means)).float()


def clusters_by_class(means: torch.Tensor, out_dim: int, cluster_of: list[int]) -> nn.Module:
    """An encoder that sends class c to cluster ``cluster_of[c]``; the style code reads zero."""
    output = nn.Linear(10, out_dim)
    with torch.no_grad():
        output.weight.zero_()
        output.bias.zero_()
        for c, cluster in enumerate(cluster_of):
            output.weight[cluster, c] = 10.0
    return nn.Sequential(NearestClass(means), output)


def templates_and_means(tmp_path, n_train: int, n_test: int, val_size: int):
    data = MNISTDataModule(data_dir=str(write_idx_dataset(tmp_path / "templates", n_train=n_train, n_test=n_test)), val_size=val_size,
                           download=False, batch_size=100)
    data.setup("fit")
    images, labels = data.splits["train"]
    return data, torch.stack([images[labels == c].mean(0) for c in range(10)])


def test_cluster_split_gives_the_empty_cluster_the_half_of_a_two_class_cluster(tmp_path):
    data, means = templates_and_means(tmp_path, n_train=600, n_test=100, val_size=200)
    # classes 0 and 1 share cluster 0; cluster 1 is empty
    cluster_of = [0, 0, 2, 3, 4, 5, 6, 7, 8, 9]
    model = AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(10)), "z": LatentCode(GaussianPrior(2))}, discriminator_hidden=(8,),
                                   encoder=lambda shape, out_dim: clusters_by_class(means, out_dim, cluster_of), lr=1e-8,
                                   lr_discriminator=1e-8, lr_generator=1e-8, figures_every_n_epochs=0,
                                   terms={"neighbours": NeighbourAgreement(neighbours=2, memory_size=50)})
    split = ClusterSplit(start_step=0, every_n_steps=3)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=3,
                        callbacks=[EMAWeights(batch_norm_batches=0), split])
    (before,) = trainer.validate(model, data, verbose=False)
    assert before["val/purity"] < 0.95 and before["val/clusters_used"] == 9, before
    trainer.fit(model, data)
    # one batch (three optimizer steps), one check: cluster 0's two classes are cut apart into cluster 1
    assert split.splits == [(3, 0, 1)]
    (after,) = trainer.validate(model, data, verbose=False)
    # validation reads the weight average, which got the same cut
    assert after["val/purity"] == 1.0 and after["val/clusters_used"] == 10, after
    # the decoder draws the new cluster as the old one, and the optimizer carries on as for the old one
    decoder = decoder_input_layer(model).weight
    assert torch.equal(decoder[:, 1], decoder[:, 0]) and not torch.equal(decoder[:, 2], decoder[:, 0])
    for parameter, dim in ((model.encoder_output_layer().weight, 0), (decoder, 1)):
        moments = trainer.optimizers[0].state[parameter]["exp_avg"]
        assert torch.equal(moments.select(dim, 1), moments.select(dim, 0))
    # the neighbour term's memory held cluster 0 for the moved images: it starts again
    assert model.terms["neighbours"]._memory is None


def test_cluster_split_leaves_a_model_whose_clusters_are_all_in_use_alone(tmp_path):
    data, means = templates_and_means(tmp_path, n_train=300, n_test=50, val_size=100)
    # classes 0 and 1 share cluster 0, and each of the 9 clusters holds images
    cluster_of = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    model = AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(9)), "z": LatentCode(GaussianPrior(2))}, discriminator_hidden=(8,),
                                   encoder=lambda shape, out_dim: clusters_by_class(means, out_dim, cluster_of), figures_every_n_epochs=0)
    split = ClusterSplit(start_step=0, every_n_steps=3)
    L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=3, callbacks=[split]).fit(model, data)
    assert split.splits == []


def test_cluster_split_needs_a_datamodule_whose_training_images_it_reads(tmp_path):
    data, means = templates_and_means(tmp_path, n_train=300, n_test=50, val_size=100)
    model = AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(10)), "z": LatentCode(GaussianPrior(2))}, discriminator_hidden=(8,),
                                   figures_every_n_epochs=0)
    loader = DataLoader(TensorDataset(*data.splits["train"]), batch_size=100)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=3, callbacks=[ClusterSplit()])
    with pytest.raises(ValueError, match="ClusterSplit: needs one of aae_lightning's DataModules"):
        trainer.fit(model, loader)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_share": 1.5}, "min_share must lie in"),
    ({"every_n_steps": 0}, "every_n_steps >= 1"),
    ({"margin": 0}, "margin > 0"),
])
def test_cluster_split_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterSplit(**kwargs)
