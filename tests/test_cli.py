import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from aae_lightning.cli import cli_main
from aae_lightning.precision import choose_precision, cpu_has_bf16
from conftest import CONFIGS, ONLY_THE_WEIGHT_AVERAGE
from aae_lightning.offline_runs import offline_runs

ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--data.download=false", "--data.val_size=100"]


def resolved_config(config: Path, capsys) -> dict:
    """The config as the CLI reads it, the configs it extends applied: what ``--print_config`` prints."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def data_args_for(resolved: dict, request) -> list[str]:
    """The tiny dataset a config's DataModule reads, and the TINY arguments it takes."""
    data_class = resolved["data"]["class_path"].rsplit(".", 1)[1]
    fixture = {"SVHNDataModule": "svhn_dir", "FashionMNISTDataModule": "fashion_dir",
               "ImageFolderDataModule": "image_folder_dir"}.get(data_class, "mnist_dir")
    # a folder of one's own images has nothing to download
    tiny = [a for a in TINY if not a.startswith("--data.download")] if data_class == "ImageFolderDataModule" else TINY
    return [f"--data.data_dir={request.getfixturevalue(fixture)}", *tiny]


def last_checkpoint(root: Path) -> Path:
    (ckpt,) = root.glob("runs/*/*/checkpoints/last.ckpt")
    return ckpt


def fewer_labels(resolved: dict) -> list[str]:
    """The tiny datasets have 50 training images per class."""
    return ["--data.num_labeled=100"] if resolved["data"]["init_args"].get("num_labeled") else []


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=[c.stem for c in ALL_CONFIGS])
def test_every_config_fits_on_tiny_data(config, request, offline_wandb, capsys):
    resolved = resolved_config(config, capsys)
    cli_main(["fit", "--config", str(config), *data_args_for(resolved, request), *fewer_labels(resolved)])
    assert last_checkpoint(offline_wandb).is_file()
    (run,) = offline_runs(offline_wandb)
    assert run.values("train/recon_loss_epoch") and "val/recon_loss" in run.summary
    if "aae_lightning.MergedClusters" in [c["class_path"] for c in resolved["trainer"]["callbacks"]]:
        assert 0 < run.summary["val/merged/clusters_used"] <= 10 and "val/merged/acc" in run.summary
    # what the run recorded is the whole config, the configs it extends included
    assert run.config["model"] == resolved["model"] and run.config["data"]["class_path"] == resolved["data"]["class_path"]


def test_fit_then_validate_from_checkpoint_prints_val_loss(mnist_dir, offline_wandb, capsys):
    config = str(CONFIGS / "basic.yaml")
    cli_main(["fit", "--config", config, f"--data.data_dir={mnist_dir}", *TINY])
    ckpt = last_checkpoint(offline_wandb)
    capsys.readouterr()
    cli_main(["validate", "--config", config, f"--data.data_dir={mnist_dir}", "--ckpt_path", str(ckpt),
              "--data.download=false", "--data.val_size=100", "--trainer.enable_progress_bar=false"])
    assert "val/recon_loss" in capsys.readouterr().out


def test_second_run_in_same_directory_does_not_trip_over_saved_config(mnist_dir, offline_wandb):
    args = ["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", *TINY]
    cli_main(args)
    cli_main(args)
    runs = offline_runs(offline_wandb)
    assert len(runs) == 2
    assert all((r.dir / "files" / "lightning_config.yaml").is_file() for r in runs)


def test_model_overrides_reach_the_module(mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "basic.yaml"), "--model.lr=0.0003",
                  "--model.encoder=aae_lightning.nets.MLPEncoder", "--model.encoder.hidden=[64]", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["lr"] == 0.0003 and printed["encoder"]["init_args"]["hidden"] == [64]


def test_one_flag_changes_one_code_and_the_model_follows(mnist_dir):
    cli = cli_main(["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
                    "--model.codes.y.prior.num_classes=30", "--model.init_args.codes.z.init_args.prior.init_args.dim=7",
                    "--trainer.logger=false"], run=False)
    model = cli.model
    assert [(c.name, c.dim) for c in model.codes] == [("y", 30), ("z", 7)]
    codes = model.encode(torch.rand(3, 1, 28, 28))
    assert codes["y"].shape == (3, 30) and codes["z"].shape == (3, 7)
    assert model.discriminators["y"].net[0].in_features == 30 and model.cluster_metrics["val"].table["val/purity"].num_clusters == 30


def test_one_flag_changes_one_term_by_name(mnist_dir):
    cli = cli_main(["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
                    "--model.terms.contrast.weight=2", "--model.init_args.terms.neighbours.init_args.start_step=10",
                    "--trainer.logger=false"], run=False)
    terms = cli.model.terms
    assert list(terms) == ["mutual_information", "consistency", "paired", "self_labelling", "contrast", "neighbours"]
    # the flags change one setting each; the rest is the config's
    assert (terms["contrast"].weight, terms["contrast"].temperature) == (2.0, 0.5)
    assert (terms["neighbours"].start_step, terms["neighbours"].weight) == (10, 3.0)


def test_precision_is_chosen_at_start_up_and_a_config_forces_either(mnist_dir, caplog):
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(cpuinfo.read_text().split())
        assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
    args = ["--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
            "--trainer.logger=false", "--trainer.accelerator=cpu"]
    chosen = "bf16-mixed" if cpu_has_bf16() else "32-true"

    def precision_lines() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
        caplog.clear()
        return lines

    with caplog.at_level(logging.INFO):
        assert cli_main(args, run=False).trainer.precision == chosen
        (line,) = precision_lines()
        assert line.startswith(f"precision: {chosen}, as this CPU")
        for forced in ("32-true", "bf16-mixed"):
            assert cli_main([*args, f"--trainer.precision={forced}"], run=False).trainer.precision == forced
            assert precision_lines() == [f"precision: {forced}, as the config asks"]
    # an accelerator without a bf16 check (Apple's MPS) trains in fp32
    assert choose_precision("mps")[0] == "32-true"


def test_offline_wandb_is_announced_only_where_a_wandb_logger_runs(mnist_dir, caplog, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    args = ["--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false"]

    def wandb_lines(extra: list[str]) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            cli_main([*args, *extra], run=False)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B:")]

    (line,) = wandb_lines([])
    assert "offline" in line and "wandb sync" in line
    assert wandb_lines(["--trainer.logger=false"]) == []
    assert wandb_lines(["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=csv"]) == []


def test_a_first_run_in_a_fresh_folder_draws_no_wandb_warning(mnist_dir, capfd, monkeypatch):
    """wandb warned "git root runs does not exist" when the logger's save_dir was not made yet."""
    monkeypatch.delenv("WANDB_SILENT")
    cli_main(["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", *TINY])
    out, err = capfd.readouterr()
    assert "wandb: Run data is saved locally" in out + err
    assert "wandb: WARNING" not in out + err


def test_unknown_config_key_fails_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "basic.yaml"), "--model.init_args.learning_rate=0.1"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_missing_data_ends_in_one_line_naming_the_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={tmp_path / 'none'}", *TINY])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: MNIST files not found") and "train-images-idx3-ubyte" in err[0]


def test_no_checkpoints_flag_alone_turns_off_the_run_defaults_checkpoints(mnist_dir, tmp_path, monkeypatch):
    """``--trainer.enable_checkpointing=false`` is honoured as it is: the run defaults' checkpoint
    callbacks, which Lightning would refuse beside it, leave; the others stay."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={mnist_dir}", *TINY,
                    "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    assert cli.trainer.checkpoint_callbacks == [] and cli.trainer.current_epoch == 1
    assert {"InterruptCheckpoint", "EMAWeights"} <= {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_trainer_settings_the_machine_cannot_take_end_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "clustering.yaml"), "--config", str(CONFIGS / "trainer" / "gpu.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: No supported gpu backend found!"]


def test_clustering_run_records_metrics_and_images_in_wandb(mnist_dir, offline_wandb, capsys):
    config = str(CONFIGS / "clustering.yaml")
    cli_main(["fit", "--config", config, f"--data.data_dir={mnist_dir}", *TINY])
    (run,) = offline_runs(offline_wandb)
    for key in ("val/purity", "val/purity_confident", "val/acc", "val/nmi", "val/ari", "val/clusters_used"):
        assert key in run.summary, key
        assert 0 <= run.summary[key] <= (16 if key == "val/clusters_used" else 1)
    keys = {k for row in run.history for k in row}
    # each training term's loss under its name in the config
    assert {"train/terms/consistency_epoch", "train/terms/contrast_epoch"} <= keys, sorted(keys)
    media = {str(p.relative_to(run.dir / "files" / "media" / "images")).rsplit("_", 2)[0] for p in run.media()}
    for image in ("latent/z", "latent/cluster_sizes", "clusters/grid", "samples/prior"):
        assert f"{image}/_type" in keys and image in media, image
    for path in run.media():  # real pictures, not the near-black canvases of unscaled floats
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert pixels.std() > 1, path

    ckpt = last_checkpoint(offline_wandb)
    capsys.readouterr()
    cli_main(["validate", "--config", config, f"--data.data_dir={mnist_dir}", "--ckpt_path", str(ckpt),
              "--data.download=false", "--data.val_size=100", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    for key in ("val/purity", "val/acc", "val/nmi", "val/ari"):
        assert key in out


def test_offline_runs_keep_checkpoints_local_even_with_log_model(mnist_dir, offline_wandb, capsys):
    cli_main(["fit", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", *TINY,
              "--trainer.logger.init_args.log_model=true"])
    assert "log_model is ignored" in capsys.readouterr().out
    assert last_checkpoint(offline_wandb).is_file()
    (run,) = offline_runs(offline_wandb)
    assert not list(run.dir.rglob("*.ckpt")) and not list((offline_wandb / "runs").rglob("artifacts/*"))


def test_run_defaults_are_on_without_being_in_the_config_and_can_be_removed(capsys):
    """What every run needs comes from the CLI's defaults: --print_config shows it, a config's
    ``callbacks+`` adds to it, a flag removes it."""
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "clustering.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load((CONFIGS / "clustering.yaml").read_text())["trainer"]
    assert "callbacks" not in written and [c["class_path"] for c in written["callbacks+"]] == ["aae_lightning.EMAWeights"]
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert callbacks == ["aae_lightning.InterruptCheckpoint", "aae_lightning.BestCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint",
                         "aae_lightning.EMAWeights"]
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert printed["trainer"]["plugins"][0]["class_path"] == "aae_lightning.AtomicCheckpointIO"
    assert printed["seed_everything"] == 0
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "clustering.yaml"), "--trainer.callbacks=[]", "--trainer.logger=false", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"] == [] and printed["trainer"]["logger"] is False


@pytest.mark.parametrize("config, monitor, figures", [
    ("basic.yaml", ("val/recon_loss", "min"), {"PriorSamples", "LatentPlot"}),
    ("clustering.yaml", ("val/purity", "max"), {"PriorSamples", "LatentPlot", "ClusterGrid", "StyleGrid"}),
    ("semi_supervised_mnist_100.yaml", ("val/error", "min"), {"PriorSamples", "LatentPlot", "ClusterGrid", "StyleGrid"}),
    ("supervised.yaml", ("val/recon_loss", "min"), {"PriorSamples", "LatentPlot", "StyleGrid"}),
    ("dim_reduction_2d.yaml", ("val/purity", "max"), {"PriorSamples", "LatentPlot", "ClusterGrid", "StyleGrid", "RepresentationMap"}),
])
def test_best_checkpoint_and_figures_follow_from_the_model(config, monitor, figures, mnist_dir):
    cli = cli_main(["--config", str(CONFIGS / config), f"--data.data_dir={mnist_dir}", "--data.download=false",
                    "--data.val_size=100", "--trainer.logger=false"], run=False)
    assert cli.model.monitor_metric() == monitor
    best = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "BestCheckpoint")
    best.setup(cli.trainer, cli.model, "fit")
    assert (best.monitor, best.mode) == monitor
    cli.model.trainer = cli.trainer
    assert {type(cb).__name__ for cb in cli.model.configure_callbacks()} == figures
    assert all(cb.every_n_epochs == 5 for cb in cli.model.configure_callbacks())
    cli.model.figures_every_n_epochs = 0
    assert cli.model.configure_callbacks() == []


def test_drawing_figures_does_not_change_the_training_run(mnist_dir):
    """The figures draw from their own random stream: a run with them ends with the same weights.
    On the CPU, where two runs of the same seed agree to the bit (on an H200 two differed in one tensor
    of 43 unless ``deterministic``)."""
    def weights(every: int) -> dict:
        cli = cli_main(["--config", str(CONFIGS / "clustering.yaml"), f"--data.data_dir={mnist_dir}", *TINY, "--trainer.max_epochs=2",
                        "--trainer.accelerator=cpu",
                        "--trainer.logger=false", *ONLY_THE_WEIGHT_AVERAGE, "--trainer.enable_checkpointing=false",
                        f"--model.init_args.figures_every_n_epochs={every}"], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
        return cli.model.state_dict()

    drawn, plain = weights(1), weights(0)
    assert all(torch.equal(drawn[k], plain[k]) for k in plain)
