"""The rest of the paper on the same module: semi-supervised phase, supervised AAE, label-conditioned
priors, Parzen likelihood."""

import math
from functools import partial

import lightning as L
import pytest
import torch

from aae_lightning import (AdversarialAutoencoder, CategoricalPrior, GaussianMixturePrior, GaussianPrior, LatentCode, MNISTDataModule,
                           RandomAffine)
from aae_lightning.cli import cli_main
from aae_lightning.data import TensorBatches
from aae_lightning.likelihood import parzen_log_likelihood
from aae_lightning.nets import MLPDecoder, MLPEncoder
from aae_lightning.offline_runs import offline_runs
from conftest import CONFIGS, structured_images, write_idx_dataset

SMALL_NETS = ["--model.encoder=aae_lightning.nets.MLPEncoder", "--model.encoder.hidden=[256,256]",
              "--model.decoder=aae_lightning.nets.MLPDecoder", "--model.decoder.hidden=[256,256]",
              "--model.discriminator_hidden=[128,128]"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.callbacks=[]",
         "--trainer.enable_checkpointing=false", "--data.download=false"]


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("labelled"), n_train=1100, n_test=300, seed=21)


def test_num_labeled_is_balanced_seeded_and_drawn_outside_validation(mnist_dir):
    def setup(seed):
        dm = MNISTDataModule(mnist_dir, download=False, val_size=100, num_labeled=50, seed=seed)
        dm.setup("fit")
        return dm

    dm = setup(0)
    images, labels = dm.splits["labeled"]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 5))
    train_images, train_labels = dm.splits["train"]
    assert (train_labels >= 0).sum() == 50 and (train_labels == -1).sum() == len(train_labels) - 50
    val_rows = {row.numpy().tobytes() for row in dm.splits["val"][0].flatten(1)}
    assert not any(row.numpy().tobytes() in val_rows for row in images.flatten(1))
    assert torch.equal(setup(0).splits["labeled"][0], images)
    assert not torch.equal(setup(1).splits["labeled"][0], images)
    batch = next(iter(dm.train_dataloader()["labeled"]))
    assert batch[0].shape[0] == 50  # the labelled loader's batches are at most the labelled set


@pytest.mark.parametrize("num_labeled, message", [(55, "positive multiple of the 10 classes"), (0, "positive multiple")])
def test_num_labeled_must_split_evenly_over_classes(mnist_dir, num_labeled, message):
    with pytest.raises(ValueError, match=message):
        MNISTDataModule(mnist_dir, num_labeled=num_labeled)


def test_supervised_phase_lowers_the_classification_error(labelled_dir):
    cli = cli_main(["--config", str(CONFIGS / "semi_supervised_mnist_100.yaml"), f"--data.data_dir={labelled_dir}",
                    "--data.val_size=100", "--trainer.max_epochs=6", *SMALL_NETS, *QUIET], run=False)
    optimizers, _ = cli.model.configure_optimizers()
    assert len(optimizers) == 4
    (before,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    after = cli.trainer.callback_metrics["val/error"].item()
    assert before["val/error"] > 0.6
    assert after < 0.1, f"val/error {before['val/error']:.3f} -> {after:.3f}"
    (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    assert test["test/error"] < 0.1


def test_label_conditioned_prior_maps_each_class_to_its_component():
    images, labels = structured_images(1500, seed=3)
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels).long()
    y_partly_hidden = torch.where(torch.arange(len(y)) % 2 == 0, y, -1)  # half of the images unlabelled
    prior = GaussianMixturePrior(10)
    torch.manual_seed(0)
    model = AdversarialAutoencoder({"z": LatentCode(prior, conditioned=True)}, encoder=partial(MLPEncoder, hidden=(256, 256)),
                                   decoder=partial(MLPDecoder, hidden=(256, 256)), discriminator_hidden=(128, 128),
                                   lr=1e-3, lr_discriminator=5e-4, lr_generator=5e-4)
    trainer = L.Trainer(max_epochs=40, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, TensorBatches((x[:1200], y_partly_hidden[:1200]), 100, shuffle=True))
    with torch.no_grad():
        z = model.encode(x[1200:])["z"]
    angle = torch.atan2(z[:, 1], z[:, 0]) % (2 * math.pi)
    component = torch.round(angle / (2 * math.pi / 10)).long() % 10
    # chance is 0.1; this short run puts most classes on their own component (README: it is slow
    # to untangle the last few, which must cross the others' components to get to theirs)
    assert (component == y[1200:]).float().mean() > 0.4


def test_conditioned_prior_must_have_one_part_per_class():
    with pytest.raises(ValueError, match="has a prior with 16 parts but the data has 10 classes"):
        AdversarialAutoencoder({"z": LatentCode(GaussianMixturePrior(16), conditioned=True)}, num_classes=10)


def test_supervised_aae_encodes_only_style_and_draws_the_style_content_grid(mnist_dir, offline_wandb):
    cli_main(["fit", "--config", str(CONFIGS / "supervised.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
              "--data.val_size=100", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false"])
    (ckpt,) = offline_wandb.glob("runs/*/*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    last_encoder_layer = [k for k in state if k.startswith("encoder.") and k.endswith("weight")][-1]  # state dicts keep layer order
    assert state[last_encoder_layer].shape[0] == 8, "the encoder must output only the 8-D style"
    (run,) = offline_runs(offline_wandb)
    grids = [p for p in run.media() if "style_content" in str(p)]
    assert grids


def test_parzen_matches_closed_form_gaussians():
    torch.manual_seed(0)
    x = torch.randn(37, 5)
    mu = torch.randn(2, 5)
    sigma = 0.7
    normal = [torch.distributions.MultivariateNormal(m, sigma**2 * torch.eye(5)) for m in mu]
    expected_one = normal[0].log_prob(x)
    expected_two = torch.logsumexp(torch.stack([n.log_prob(x) for n in normal]), 0) - math.log(2)
    assert torch.allclose(parzen_log_likelihood(x, mu[:1], torch.tensor([sigma]))[0], expected_one, atol=1e-4)
    for chunk in (1, 8, 100):
        got = parzen_log_likelihood(x, mu, torch.tensor([0.3, sigma]), chunk=chunk)
        assert got.shape == (2, 37)
        assert torch.allclose(got[1], expected_two, atol=1e-4)


def test_parzen_likelihood_is_logged_by_test(mnist_dir, offline_wandb, capsys):
    args = ["--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
            "--data.val_size=100", "--trainer.enable_progress_bar=false"]
    cli_main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"])
    (ckpt,) = offline_wandb.glob("runs/*/*/checkpoints/last.ckpt")
    capsys.readouterr()
    cli_main(["test", *args, "--ckpt_path", str(ckpt), "--trainer.callbacks+=aae_lightning.ParzenLikelihood",
              "--trainer.callbacks.num_samples=500"])
    out = capsys.readouterr().out
    assert "test/parzen_ll" in out and "test/parzen_sigma" in out


def test_supervised_perturbation_is_applied_to_the_labelled_batch_only(mnist_dir):
    class CountingAffine(RandomAffine):
        def __init__(self):
            super().__init__()
            self.batch_sizes = []

        def __call__(self, x, predict=None):
            self.batch_sizes.append(len(x))
            return super().__call__(x, predict)

    perturbation = CountingAffine()
    model = AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(10)), "z": LatentCode(GaussianPrior(2))}, supervised_code="y",
                                   supervised_perturbation=perturbation, encoder=partial(MLPEncoder, hidden=(64,)),
                                   decoder=partial(MLPDecoder, hidden=(64,)), discriminator_hidden=(16,))
    data = MNISTDataModule(mnist_dir, download=False, val_size=100, batch_size=100, num_labeled=50)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert perturbation.batch_sizes == [50, 50, 50]  # once per step, on the 50 labelled images, never on the others
