"""Every kind of bad input, through the CLI: one clear line on stderr, a non-zero exit, no traceback."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aae_lightning.cli import cli_main
from conftest import CONFIGS, ONLY_THE_WEIGHT_AVERAGE, write_idx, write_idx_dataset, structured_images

BASIC = str(CONFIGS / "basic.yaml")
CLUSTERING = str(CONFIGS / "clustering.yaml")
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--data.download=false", "--data.val_size=100"]


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def codes_config(tmp_path: Path, *codes: tuple[str, dict]) -> str:
    path = tmp_path / "codes.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_args": {"codes": dict(codes)}}}, sort_keys=False))
    return str(path)


def code(name, prior, conditioned=False, **prior_args) -> tuple[str, dict]:
    return name, {"class_path": "aae_lightning.LatentCode",
                  "init_args": {"conditioned": conditioned, "prior": {"class_path": f"aae_lightning.{prior}", "init_args": prior_args}}}


# ---- configs ------------------------------------------------------------------------------------
def only_line(err: str) -> str:
    """A parse error is the whole of stderr: one line, not the parser's usage before it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_config_key(mnist_dir, capsys):
    code_, err = run_cli(["fit", "--config", BASIC, "--trainer.max_epochz=3"], capsys)
    assert code_ == 2 and only_line(err) == "error: unrecognized arguments: --trainer.max_epochz=3"


def test_unknown_key_in_a_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rate: 0.1\n")
    code_, err = run_cli(["fit", "--config", BASIC, "--config", str(bad)], capsys)
    line = only_line(err)
    assert code_ == 2 and '"model"' in line and "'learning_rate' is not accepted" in line


def test_unknown_key_of_a_nested_class(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    codes:\n      y: {prior: {class_path: aae_lightning.CategoricalPrior, "
                   "init_args: {num_classez: 3}}}\n")
    code_, err = run_cli(["fit", "--config", BASIC, "--config", str(bad)], capsys)
    assert code_ == 2 and "'num_classez' is not accepted" in only_line(err)


def test_override_of_a_code_the_config_lacks(capsys):
    # basic.yaml has only z: jsonargparse alone would refuse "Option 'num_classes'" without naming y
    for override in ("--model.codes.y.prior.num_classes=30", "--model.init_args.codes.y.prior.init_args.num_classes=30"):
        code_, err = run_cli(["fit", "--config", BASIC, override, "--print_config"], capsys)
        line = only_line(err)
        assert code_ == 2 and line.startswith(f"error: {override} changes a code the config does not have (its codes: z)")
        assert "--model.codes.y.prior.class_path=" in line
    # the benchmarks' parser has no subcommands
    with pytest.raises(SystemExit):
        cli_main(["--config", BASIC, "--model.codes.y.prior.num_classes=30"], run=False)
    assert "changes a code the config does not have" in only_line(capsys.readouterr().err)
    # a code the override creates with its prior's class is not unknown: the misspelt option is the error
    code_, err = run_cli(["fit", "--config", BASIC, "--model.codes.y.prior.class_path=aae_lightning.CategoricalPrior",
                          "--model.codes.y.prior.num_classez=30"], capsys)
    assert code_ == 2 and "'num_classez' is not accepted" in only_line(err)


def test_wrong_type(capsys):
    code_, err = run_cli(["fit", "--config", BASIC, "--trainer.max_epochs=many"], capsys)
    line = only_line(err)
    assert code_ == 2 and '"trainer.max_epochs"' in line and "int" in line and line.endswith("given 'many'")
    assert "NoneType" not in line


def test_missing_config_file(capsys):
    code_, err = run_cli(["fit", "--config", "no/such/config.yaml"], capsys)
    assert code_ == 2 and "no/such/config.yaml" in only_line(err)


def test_missing_subcommand(capsys):
    code_, err = run_cli([], capsys)
    assert code_ == 2 and "fit" in only_line(err)


# ---- values the constructors refuse ---------------------------------------------------------------
@pytest.mark.parametrize("codes, message", [
    ((code("y", "CategoricalPrior", num_classes=1), code("z", "GaussianPrior", dim=5)), "num_classes must be >= 2, got 1"),
    ((code("y", "CategoricalPrior", num_classes=16), code("z", "GaussianPrior", dim=0)), "dim must be >= 1, got 0"),
    ((code("y", "CategoricalPrior", num_classes=16), code("style z", "GaussianPrior", dim=5)), "a code's name must be an identifier"),
    ((code("z", "GaussianMixturePrior", conditioned=True, num_components=16),),
     "code 'z' (label-conditioned) has a prior with 16 parts but the data has 10 classes"),
    ((code("z", "GaussianPrior", conditioned=True, dim=2),), "conditioned=True needs a prior whose parts labels can pick"),
], ids=["K<2", "latent-dim<1", "code-name-with-a-space", "mixture-parts-vs-classes", "gaussian-cannot-be-conditioned"])
def test_invalid_codes(codes, message, tmp_path, mnist_dir, capsys):
    code_, err = run_cli(["fit", "--config", CLUSTERING, "--config", codes_config(tmp_path, *codes),
                          f"--data.data_dir={mnist_dir}", *QUICK], capsys)
    assert code_ == 2 and message in error_line(err)


@pytest.mark.parametrize("arg, message", [
    ("--model.lr=0", "lr must be > 0, got 0"),
    ("--model.lr_generator=-0.001", "lr_generator must be > 0"),
    ("--data.batch_size=0", "batch_size must be >= 1, got 0"),
    ("--data.val_size=100000", "val_size=100000 leaves no training data (600 images); give a --data.val_size below 600"),
    ("--data.num_labeled=55", "num_labeled must be a positive multiple of the 10 classes"),
    ("--data.num_labeled=1000", "num_labeled=1000 is larger than the training split (500 images)"),
])
def test_invalid_values(arg, message, mnist_dir, capsys):
    code_, err = run_cli(["fit", "--config", BASIC, f"--data.data_dir={mnist_dir}", *QUICK, arg], capsys)
    assert code_ == 2 and message in error_line(err)


def test_batch_of_one_with_a_batch_normalised_encoder(mnist_dir, capsys):
    code_, err = run_cli(["fit", "--config", CLUSTERING, f"--data.data_dir={mnist_dir}", *QUICK, "--data.batch_size=1",
                          "--model.init_args.encoder=aae_lightning.nets.MLPEncoder", "--model.init_args.encoder.init_args.batch_norm=true",
                          "--trainer.logger=false", *ONLY_THE_WEIGHT_AVERAGE, "--trainer.enable_checkpointing=false"], capsys)
    assert code_ == 2 and "needs training batches of 2 or more images; got a batch of 1" in error_line(err)


def test_pseudo_labels_from_the_weight_average_without_the_averaging_callback(mnist_dir, tmp_path, capsys):
    terms = ("{self_labelling: {class_path: aae_lightning.SelfLabelling, init_args: {perturbation: {class_path: aae_lightning.RandomAffine}, "
             "targets: weight_average}}}")
    code_, err = run_cli(["fit", "--config", CLUSTERING, f"--data.data_dir={mnist_dir}", *QUICK, f"--model.init_args.terms={terms}",
                          "--trainer.logger=false", "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert code_ == 2 and "takes its targets from the weight average: add aae_lightning.EMAWeights to trainer.callbacks" in error_line(err)


# ---- data ---------------------------------------------------------------------------------------
def test_missing_data_files_say_where_to_put_them(tmp_path, capsys):
    code_, err = run_cli(["fit", "--config", BASIC, f"--data.data_dir={tmp_path / 'empty'}", *QUICK], capsys)
    line = error_line(err)
    assert code_ == 2 and "MNIST files not found" in line and "train-images-idx3-ubyte" in line and str(tmp_path / "empty") in line


def test_truncated_idx_file(tmp_path, capsys):
    folder = write_idx_dataset(tmp_path / "mnist", compress=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1000])
    code_, err = run_cli(["fit", "--config", BASIC, f"--data.data_dir={folder}", *QUICK], capsys)
    assert code_ == 2 and "truncated or corrupt" in error_line(err) and str(images) in err


def test_corrupt_gzip(tmp_path, capsys):
    folder = write_idx_dataset(tmp_path / "mnist")
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    code_, err = run_cli(["fit", "--config", BASIC, f"--data.data_dir={folder}", *QUICK], capsys)
    assert code_ == 2 and f"cannot read {labels}" in error_line(err)


def test_wrong_image_shape(tmp_path, capsys):
    folder = write_idx_dataset(tmp_path / "mnist")
    images, _ = structured_images(600, size=32)
    write_idx(folder / "train-images-idx3-ubyte", images[..., 0])
    code_, err = run_cli(["fit", "--config", BASIC, f"--data.data_dir={folder}", *QUICK], capsys)
    assert code_ == 2 and "expected images of shape (N, 1, 28, 28)" in error_line(err) and "(600, 1, 32, 32)" in err


def test_corrupt_svhn_mat(tmp_path, svhn_dir, capsys):
    folder = tmp_path / "svhn"
    folder.mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (folder / name).write_bytes((svhn_dir / name).read_bytes()[:5000])
    code_, err = run_cli(["fit", "--config", str(CONFIGS / "clustering_svhn.yaml"), f"--data.data_dir={folder}", *QUICK], capsys)
    assert code_ == 2 and f"cannot read {folder / 'train_32x32.mat'}" in error_line(err)


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.fixture
def basic_checkpoint(mnist_dir, offline_wandb) -> Path:
    cli_main(["fit", "--config", BASIC, f"--data.data_dir={mnist_dir}", *QUICK])
    (ckpt,) = offline_wandb.glob("runs/*/*/checkpoints/last.ckpt")
    return ckpt


def test_checkpoint_of_another_config_names_the_parameter(basic_checkpoint, svhn_dir, capsys):
    # the model's hyperparameters come from the checkpoint, but the image shape follows the data
    code_, err = run_cli(["validate", "--config", BASIC, "--data=aae_lightning.SVHNDataModule", f"--data.data_dir={svhn_dir}",
                          *QUICK, "--ckpt_path", str(basic_checkpoint)], capsys)
    line = error_line(err)
    assert code_ == 2 and "different config" in line
    assert "encoder.1.0.weight: checkpoint (1000, 784) vs config (1000, 3072)" in line


def test_truncated_checkpoint(basic_checkpoint, mnist_dir, tmp_path, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(basic_checkpoint.read_bytes()[:4096])
    code_, err = run_cli(["validate", "--config", BASIC, f"--data.data_dir={mnist_dir}", *QUICK, "--ckpt_path", str(broken)], capsys)
    assert code_ == 2 and f"cannot read checkpoint {broken}" in error_line(err)


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_in_a_checkpoint_is_refused_not_run(basic_checkpoint, mnist_dir, tmp_path, capsys):
    checkpoint = torch.load(basic_checkpoint, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["hyper_parameters"]["payload"] = Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    for subcommand in ("validate", "fit"):
        code_, err = run_cli([subcommand, "--config", BASIC, f"--data.data_dir={mnist_dir}", *QUICK, "--ckpt_path", str(evil)], capsys)
        assert code_ == 2 and f"refusing to load {evil}" in error_line(err)
        assert not marker.exists(), "the checkpoint's pickle ran code"


# ---- training -------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_phase_and_keeps_the_last_checkpoint(basic_checkpoint, mnist_dir, tmp_path, capsys):
    before = basic_checkpoint.read_bytes()
    # an absurd learning rate blows the weights up within a few steps
    code_, err = run_cli(["fit", "--config", BASIC, f"--data.data_dir={mnist_dir}", *QUICK, "--model.lr=1e30",
                          "--model.lr_discriminator=1e30", "--trainer.limit_train_batches=50"], capsys)
    line = error_line(err)
    assert code_ == 2 and " loss is " in line and "global step" in line and "training stopped" in line
    assert basic_checkpoint.read_bytes() == before
    newest = sorted(Path.cwd().glob("runs/*/*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert newest == basic_checkpoint, "the failed run wrote a checkpoint"


# ---- secrets ------------------------------------------------------------------------------------
def test_no_secret_reaches_logs_configs_or_checkpoints(mnist_dir, offline_wandb, monkeypatch):
    secret = "wandb-secret-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("MY_SERVICE_TOKEN", secret)
    cli_main(["fit", "--config", BASIC, f"--data.data_dir={mnist_dir}", *QUICK])
    files = [p for p in offline_wandb.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert not leaked


def test_the_real_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "aae_lightning", "fit", "--config", BASIC, f"--data.data_dir={tmp_path}",
                             "--data.download=false"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [l for l in result.stderr.splitlines() if l.startswith("error:")] == [result.stderr.strip().splitlines()[-1]]
