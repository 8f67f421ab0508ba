"""The clustering config, unchanged but for data and budget, on data with an obvious cluster structure."""

import pytest
import torch

from aae_lightning import AdversarialAutoencoder, CategoricalPrior, GaussianPrior, LatentCode
from aae_lightning.cli import cli_main
from conftest import CONFIGS, write_idx_dataset


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("templates"), n_train=3500, n_test=500, seed=11)


def test_clustering_config_purifies_clusters_on_structured_data(templates_dir):
    cli = cli_main(["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={templates_dir}",
                    "--data.download=false", "--data.val_size=500", "--trainer.max_epochs=12",
                    "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.callbacks=[]",
                    "--trainer.enable_checkpointing=false"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert metrics["val/purity"] > 0.9, {k: v.item() for k, v in metrics.items() if k.startswith("val/")}
    assert metrics["val/clusters_used"] >= 10
    (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    assert test["test/purity"] > 0.9


def test_balance_term_spreads_a_collapsed_batch():
    model = AdversarialAutoencoder([LatentCode("y", CategoricalPrior(4), balance_weight=1.0), LatentCode("z", GaussianPrior(2))],
                                   encoder=None, discriminator_hidden=(8,))
    collapsed = {"y": torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 8), "z": torch.zeros(8, 2)}
    spread = {"y": torch.eye(4).repeat(2, 1) * 0.96 + 0.01, "z": torch.zeros(8, 2)}
    torch.manual_seed(0)
    with torch.no_grad():
        unlabelled = torch.full((8,), -1)
        assert model.generator_loss(collapsed, unlabelled) > model.generator_loss(spread, unlabelled) + 1.0


def test_balance_weight_needs_a_categorical_prior():
    with pytest.raises(ValueError, match="needs a categorical prior"):
        LatentCode("z", GaussianPrior(2), balance_weight=1.0)


def test_consistency_term_is_zero_for_shift_invariant_codes_and_positive_otherwise():
    torch.manual_seed(0)
    model = AdversarialAutoencoder([LatentCode("y", CategoricalPrior(4)), LatentCode("z", GaussianPrior(2))],
                                   consistency_weight=1.0, consistency_shift=3, discriminator_hidden=(8,))
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    shifted = model._shift(x)
    assert not torch.equal(shifted, x) and torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    codes = model.encode(x)
    assert model.consistency_loss(x, codes) > 0
    uniform = {"y": torch.full((16, 4), 0.25), "z": torch.zeros(16, 2)}
    with torch.no_grad():
        model.encoder[-1][-1].weight.zero_()
        model.encoder[-1][-1].bias.zero_()
    assert model.consistency_loss(x, uniform).abs() < 1e-6
