import lightning as L
import pytest
import torch
import wandb

from aae_lightning import EMAWeights
from aae_lightning.cli import cli_main
from conftest import CONFIGS


class LineFit(L.LightningModule):
    """A one-layer model that keeps its weights after every step, to average them by hand."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, *args):
        self.seen.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_after_fit_the_model_holds_the_warmed_up_moving_average_of_its_weights():
    model = LineFit()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(80, 2)), batch_size=4)
    trainer = L.Trainer(max_epochs=1, callbacks=[EMAWeights(decay=0.6)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)

    # by hand: the first step's weights, then each later one mixed in with decay min(0.6, (1+n)/(10+n))
    average = model.seen[0]
    for n, weights in enumerate(model.seen[1:], start=1):
        decay = min(0.6, (1 + n) / (10 + n))
        average = decay * average + (1 - decay) * weights
    assert len(model.seen) == 20
    assert torch.allclose(model.layer.weight.detach(), average, atol=1e-6)
    assert not torch.allclose(average, model.seen[-1], atol=1e-4), "the average should lag the last step"


SMALL_NETS = ["--model.encoder=aae_lightning.nets.MLPEncoder", "--model.encoder.hidden=[32]",
              "--model.decoder=aae_lightning.nets.MLPDecoder", "--model.decoder.hidden=[32]", "--model.discriminator_hidden=[32]"]


class RestoreProbe(L.Callback):
    """What a resumed fit starts from: the module's weights and the callback's average."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        (averaging,) = [cb for cb in trainer.callbacks if isinstance(cb, EMAWeights)]
        RestoreProbe.seen = {"raw": {k: v.clone() for k, v in pl_module.state_dict().items()},
                             "average": {k: v.clone() for k, v in averaging.averaged_module.state_dict().items()},
                             # the update count is Lightning's state, with no public accessor
                             "updates": int(averaging._average_model.n_averaged)}


def test_a_resumed_run_starts_from_both_the_raw_weights_and_their_average(mnist_dir, tmp_path, monkeypatch):
    """last.ckpt holds the average as its state_dict and the raw weights beside it; --ckpt_path last
    trains on from the raw weights and keeps averaging from the saved average."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
            "--data.val_size=100", "--trainer.limit_train_batches=4", "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0", "--trainer.callbacks+=aae_lightning.EMAWeights",
            "--trainer.callbacks+=test_averaging.RestoreProbe", *SMALL_NETS]
    cli_main([*args, "--trainer.max_epochs=1"])
    (ckpt,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    wandb.teardown()
    cli_main([*args, "--trainer.max_epochs=2", "--ckpt_path", "last"])

    seen = RestoreProbe.seen
    assert seen["updates"] == int(saved["averaging_state"]["n_averaged"]) == 4
    for name, value in saved["current_model_state"].items():
        assert torch.equal(seen["raw"][name], value), f"raw weight {name} not restored"
    for name, value in saved["state_dict"].items():
        assert torch.equal(seen["average"][name], value), f"average of {name} not restored"
    differ = [n for n, v in saved["state_dict"].items() if v.is_floating_point() and not torch.equal(v, saved["current_model_state"][n])]
    assert differ, "the checkpoint's state_dict should be the average, not the raw weights"


def test_a_decay_outside_zero_to_one_is_refused_in_one_line(mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
                  "--trainer.logger=false", "--trainer.callbacks=[aae_lightning.EMAWeights]", "--trainer.callbacks.decay=1.5"])
    assert exit_info.value.code == 2
    assert "EMAWeights: decay=1.5 must lie between 0 and 1" in capsys.readouterr().err


class NoisyEncoderFit(L.LightningModule):
    """An encoder with batch norm and dropout, trained on heavily noised inputs: the running
    statistics training leaves are those of the noisy copies, not of the clean images."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        noisy = batch[0] + 3 * torch.randn_like(batch[0])
        return self.encoder(noisy).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.encoder(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CleanImages(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.images = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 1.0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.images), batch_size=20)

    def val_dataloader(self):
        return self.train_dataloader()


def fit_noisy_encoder(batch_norm_batches: int) -> tuple[NoisyEncoderFit, EMAWeights, CleanImages]:
    torch.manual_seed(0)
    model, data = NoisyEncoderFit(), CleanImages()
    averaging = EMAWeights(batch_norm_batches=batch_norm_batches)
    trainer = L.Trainer(max_epochs=2, callbacks=[averaging], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    return model, averaging, data


def test_the_average_recomputes_its_batch_norm_statistics_from_clean_training_images():
    recomputed, _, data = fit_noisy_encoder(batch_norm_batches=10)
    averaged, _, _ = fit_noisy_encoder(batch_norm_batches=0)

    # by hand: the statistics of the averaged first layer's outputs on the clean images
    with torch.no_grad():
        hidden = recomputed.encoder[0](data.images)
    norm = recomputed.encoder[1]
    assert torch.allclose(norm.running_mean, hidden.mean(0), atol=1e-5)
    # update_bn averages the ten batches' unbiased variances
    batch_vars = torch.stack([hidden[i:i + 20].var(0) for i in range(0, 200, 20)]).mean(0)
    assert torch.allclose(norm.running_var, batch_vars, rtol=1e-4)
    # averaged like the weights, the statistics keep the noise: variances several times larger
    assert (averaged.encoder[1].running_var > 3 * batch_vars).all()


def test_recomputing_the_statistics_leaves_the_training_run_as_it_was():
    """The recomputation's train-mode passes (dropout included) draw nothing from the run's random
    stream: the raw weights end the same with and without it."""
    _, with_it, _ = fit_noisy_encoder(batch_norm_batches=10)
    _, without, _ = fit_noisy_encoder(batch_norm_batches=0)
    assert with_it._raw_at_end.keys() == without._raw_at_end.keys()
    for name, value in with_it._raw_at_end.items():
        assert torch.equal(value, without._raw_at_end[name]), name


def test_recomputing_the_statistics_without_a_datamodule_says_what_to_do():
    data = CleanImages()
    trainer = L.Trainer(max_epochs=1, callbacks=[EMAWeights()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="from the DataModule's training images: fit with a DataModule, or set batch_norm_batches: 0"):
        trainer.fit(NoisyEncoderFit(), data.train_dataloader(), data.val_dataloader())
