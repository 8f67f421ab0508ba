"""After training: predictions and figures on disk, the figures verb, the end-of-run summary, a
trained model in Python (the README's example), and clustering a folder of one's own images."""

import csv
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aae_lightning import Deskew, ImageFolderDataModule, PenWidth
from aae_lightning.cli import cli_main
from aae_lightning.data import DataError
from conftest import CONFIGS, structured_images, write_image_folder
from test_cli import TINY, last_checkpoint

CLUSTERING = str(CONFIGS / "clustering.yaml")
README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-sample"
EVAL = ["--data.download=false", "--data.val_size=100", "--trainer.enable_progress_bar=false"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def fit(config: str, data_dir, *extra) -> Path:
    cli_main(["fit", "--config", config, f"--data.data_dir={data_dir}", *TINY, *extra])
    return last_checkpoint(Path.cwd())


def assert_not_blank(path: Path) -> None:
    assert np.asarray(Image.open(path).convert("L"), dtype=np.float32).std() > 1, path


def readme_example() -> str:
    """The Python block of the README's "Using a trained model" section."""
    section = README.read_text().split("## Using a trained model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_readme_example(checkpoint: Path, data_dir: Path) -> dict:
    code = readme_example()
    code = re.sub(r'checkpoint = ".*"', f"checkpoint = {str(checkpoint)!r}", code)
    code = re.sub(r'data_dir = ".*"', f"data_dir = {str(data_dir)!r}", code)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_fit_writes_figures_as_png_and_ends_with_a_summary(mnist_dir, offline_wandb, capsys):
    ckpt = fit(CLUSTERING, mnist_dir)
    out = capsys.readouterr().out
    run_dir = ckpt.parent.parent
    for name in ("latent_z", "latent_cluster_sizes", "clusters_grid", "samples_prior"):
        path = run_dir / "figures" / f"{name}_epoch0000.png"
        assert path.is_file(), path
        assert_not_blank(path)
    assert re.search(r"last validation \(epoch 0\): .*val/purity=0\.\d{4}", out)
    assert re.search(r"best validation by val/purity \(epoch 0\): ", out)
    last = re.search(r"last checkpoint: (\S+)", out)
    assert last and (offline_wandb / last.group(1)).resolve() == ckpt.resolve()
    assert f"figures: {run_dir.relative_to(offline_wandb) / 'figures'}" in out
    sync = re.search(r"upload it with: wandb sync (\S+)", out)
    assert sync and (offline_wandb / sync.group(1) / "files").is_dir()


def test_predict_writes_one_row_per_test_image_into_the_checkpoints_run(mnist_dir, offline_wandb, capsys):
    ckpt = fit(CLUSTERING, mnist_dir)
    capsys.readouterr()
    cli_main(["predict", "--config", CLUSTERING, f"--data.data_dir={mnist_dir}", "--ckpt_path", str(ckpt), *EVAL])
    path = ckpt.resolve().parent.parent / "predictions" / "test.csv"
    assert f"predict: wrote 200 rows to {path}" in capsys.readouterr().out
    rows = read_csv(path)
    _, labels = structured_images(200, seed=1)  # the fixture's test split
    assert [int(r["index"]) for r in rows] == list(range(200))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    for row in rows:
        y = np.array([float(row[f"y_{i}"]) for i in range(16)])
        assert int(row["cluster"]) == y.argmax() and float(row["confidence"]) == pytest.approx(y.max(), rel=1e-4)
        assert y.sum() == pytest.approx(1, abs=1e-4)
        assert all(f"z_{i}" in row for i in range(5))


def test_figures_verb_draws_a_checkpoint_on_a_split(mnist_dir, offline_wandb, capsys):
    ckpt = fit(CLUSTERING, mnist_dir)
    capsys.readouterr()
    cli_main(["figures", "--config", CLUSTERING, f"--data.data_dir={mnist_dir}", "--ckpt_path", str(ckpt), "--split", "val", *EVAL])
    folder = ckpt.resolve().parent.parent / "figures" / "val"
    assert f"figures: wrote 5 PNG files to {folder}" in capsys.readouterr().out
    for name in ("latent_z", "latent_cluster_sizes", "clusters_grid", "samples_prior", "samples_style_content"):
        assert_not_blank(folder / f"{name}.png")
    # samples per cluster: 10 styles (rows) x 16 clusters (columns) of 28-pixel tiles with 2-pixel padding
    assert Image.open(folder / "samples_style_content.png").size == (2 + 16 * 30, 2 + 10 * 30)


def test_evaluation_verbs_take_the_newest_runs_best_checkpoint(mnist_dir, offline_wandb, capsys):
    """``--ckpt_path best`` in a new process is the best checkpoint of the newest earlier run, not
    its last.ckpt. Here the best is the highest reconstruction loss, epoch 0 of three, as a real
    run's validation peak comes before its end; and a verb without a checkpoint says that its weights
    are untrained. The fit ran under a time limit, as the README's runs do: its Timer's state draws
    no warning from the evaluation."""
    peaks_first = '--trainer.callbacks=[{class_path: aae_lightning.BestCheckpoint, init_args: {monitor: val/recon_loss, mode: max}}]'
    last = fit(str(CONFIGS / "basic.yaml"), mnist_dir, "--trainer.max_epochs=3", "--trainer.max_time=00:00:10:00", peaks_first)
    (best,) = last.parent.glob("epoch=0-*.ckpt")
    args = ["--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", peaks_first, *EVAL]

    def test_loss(ckpt_path: str) -> float:
        cli = cli_main(["test", *args, "--ckpt_path", ckpt_path])
        return float(cli.trainer.callback_metrics["test/recon_loss"])

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_name = test_loss("best")
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
    assert f"test: --ckpt_path best is {best.relative_to(offline_wandb)}" in capsys.readouterr().out
    assert by_name == test_loss(str(best)) != test_loss(str(last))
    cli_main(["figures", *args, "--ckpt_path", "best", "--split", "val"])
    assert "figures: wrote" in capsys.readouterr().out and (last.parent.parent / "figures" / "val" / "latent_z.png").is_file()
    cli_main(["test", *args])
    assert "test: no --ckpt_path, so these are untrained weights" in capsys.readouterr().out


def test_best_of_a_run_that_monitored_nothing_is_one_line(mnist_dir, offline_wandb, capsys):
    only_last = "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"
    last = fit(str(CONFIGS / "basic.yaml"), mnist_dir, only_last)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["test", "--config", str(CONFIGS / "basic.yaml"), f"--data.data_dir={mnist_dir}", "--ckpt_path", "best", *EVAL])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    recorded = last.relative_to(offline_wandb)
    assert err == [f"error: test: --ckpt_path best found no best checkpoint recorded in {recorded}, the newest run's last.ckpt"]


@pytest.mark.parametrize("verb", ["predict", "figures"])
@pytest.mark.parametrize("ckpt_path, message", [("", "--ckpt_path is empty"), ("missing.ckpt", "missing.ckpt does not exist"),
                                                 ("best", "--ckpt_path best found no last.ckpt from an earlier run")])
def test_bad_checkpoint_path_is_one_line(verb, ckpt_path, message, mnist_dir, offline_wandb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([verb, "--config", CLUSTERING, f"--data.data_dir={mnist_dir}", f"--ckpt_path={ckpt_path}", *EVAL])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_readme_example_loads_a_checkpoint_and_encodes_and_decodes(mnist_dir, offline_wandb):
    ckpt = fit(CLUSTERING, mnist_dir)
    found = run_readme_example(ckpt, mnist_dir)
    # the DataModule comes back as the run configured it: the config's transform, the command line's split
    assert [type(t) for t in found["data"].transform] == [Deskew, PenWidth] and found["data"].val_size == 100
    assert found["clusters"].shape == (8,) and found["clusters"].dtype == torch.int64
    assert found["images"].shape == found["reconstructions"].shape == (8, 1, 28, 28)
    assert 0 <= found["reconstructions"].min() and found["reconstructions"].max() <= 1
    assert found["samples"].shape == (16, 1, 28, 28)


def test_a_normal_run_prints_no_warnings_of_ours(mnist_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    result = subprocess.run([sys.executable, "-m", "aae_lightning", "fit", "--config", str(CONFIGS / "basic.yaml"),
                             f"--data.data_dir={mnist_dir}", *TINY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for noise in ("anonymous setting", "litlogger", "LeafSpec", "Sparse invariant"):
        assert noise not in output, noise
    assert "fit ended after 1 epochs" in output


# ---- your own images ------------------------------------------------------------------------
def test_image_folder_with_class_subfolders_keeps_labels_for_evaluation(image_folder_dir):
    data = ImageFolderDataModule(str(image_folder_dir), val_size=50)
    assert (data.input_shape, data.num_classes) == ((1, 28, 28), 10)
    data.setup("fit")
    images, labels = data.splits["train"]
    assert images.shape == (250, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert sorted(labels.unique().tolist()) == list(range(10))
    names = data.example_names("train")
    # each row's label is its subfolder's name
    assert all(names[i].split("/")[0] == str(label) for i, label in zip(data.source_index["train"].tolist(), labels.tolist()))


def test_flat_image_folder_has_no_labels_and_is_resized(tmp_path):
    folder = write_image_folder(tmp_path / "flat", n=40, by_class=False)
    data = ImageFolderDataModule(str(folder), channels=3, image_size=(20, 24))
    assert (data.input_shape, data.num_classes) == ((3, 20, 24), 0)
    data.setup("test")
    images, labels = data.splits["test"]
    assert images.shape == (40, 3, 20, 24) and bool((labels == -1).all())


def broken(kind: str, folder: Path) -> Path:
    folder.mkdir()
    if kind == "empty":
        return folder
    write_image_folder(folder, n=20, by_class=False)
    if kind == "unreadable":
        (folder / "zz.png").write_bytes(b"not an image")
    elif kind == "truncated":
        (folder / "zz.png").write_bytes((folder / "img0000.png").read_bytes()[:80])
    elif kind == "mixed sizes":
        Image.new("L", (30, 30)).save(folder / "zz.png")
    elif kind == "images beside subfolders":
        (folder / "cats").mkdir()
        Image.new("L", (28, 28)).save(folder / "cats" / "a.png")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist: put your PNG/JPEG images there"),
    ("empty", "holds no images"),
    ("unreadable", "cannot read image"),
    ("truncated", "cannot read image"),
    ("mixed sizes", "set image_size: [height, width]"),
    ("images beside subfolders", "holds both images and subfolders"),
])
def test_bad_image_folder_is_one_line(kind, message, tmp_path, capsys):
    folder = tmp_path / "images" if kind == "missing" else broken(kind, tmp_path / "images")
    # the config resizes every image; without a size, sizes must agree
    size = ["--data.image_size=null"] if kind == "mixed sizes" else []
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "clustering_folder.yaml"), f"--data.data_dir={folder}", *TINY[:-2], *size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_mixed_sizes_are_fine_with_an_image_size(tmp_path):
    data = ImageFolderDataModule(str(broken("mixed sizes", tmp_path / "images")), image_size=(28, 28), val_size=5)
    data.setup("fit")
    assert len(data.splits["train"][0]) + len(data.splits["val"][0]) == 21


def test_clustering_a_flat_folder_end_to_end(tmp_path, offline_wandb, capsys):
    folder = write_image_folder(tmp_path / "mine", n=120, by_class=False)
    config = str(CONFIGS / "clustering_folder.yaml")
    args = ["--config", config, f"--data.data_dir={folder}", "--trainer.enable_progress_bar=false"]
    cli_main(["fit", *args, "--trainer.max_epochs=1"])
    ckpt = last_checkpoint(offline_wandb)
    assert "val/purity" not in capsys.readouterr().out
    cli_main(["predict", *args, "--ckpt_path", str(ckpt)])
    rows = read_csv(ckpt.parent.parent / "predictions" / "test.csv")
    assert [r["name"] for r in rows] == [f"img{i:04d}.png" for i in range(120)]
    assert all(r["label"] == "" and 0 <= int(r["cluster"]) < 16 for r in rows)
    cli_main(["figures", *args, "--ckpt_path", str(ckpt)])
    assert_not_blank(ckpt.parent.parent / "figures" / "test" / "clusters_grid.png")


# ---- the real-digit check of a fresh clone ----------------------------------------------------
def grid_tiles(path: Path, columns: int) -> np.ndarray:
    """The 28x28 tiles of a torchvision grid (2-pixel padding), as floats in [0, 1]."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
    rows = (pixels.shape[0] - 2) // 30
    return np.stack([pixels[2 + 30 * r : 30 * r + 30, 2 + 30 * c : 30 * c + 30] for r in range(rows) for c in range(columns)])


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the real MNIST sample is not at {SAMPLE}")
def test_real_digits_fit_predict_figures_and_notebook(offline_wandb, capsys):
    data = [f"--data.data_dir={SAMPLE}", "--data.download=false", "--data.val_size=500", "--trainer.enable_progress_bar=false"]
    cli_main(["fit", "--config", CLUSTERING, *data, "--trainer.max_epochs=2"])
    ckpt = last_checkpoint(offline_wandb)
    cli_main(["predict", "--config", CLUSTERING, *data, "--ckpt_path", str(ckpt)])
    rows = read_csv(ckpt.parent.parent / "predictions" / "test.csv")
    assert len(rows) == 500 and sorted({r["label"] for r in rows}) == [str(d) for d in range(10)]
    cli_main(["figures", "--config", CLUSTERING, *data, "--ckpt_path", str(ckpt)])
    # the cluster grid shows test digits as the config loads them (deskewed, say): every filled
    # tile after each row's head is one of them
    test = cli_main(["--config", CLUSTERING, *data, "--trainer.logger=false"], run=False).datamodule
    test.setup("test")
    digits = test.splits["test"][0][:, 0].numpy()
    tiles = grid_tiles(ckpt.parent.parent / "figures" / "test" / "clusters_grid.png", 11).reshape(-1, 11, 28, 28)[:, 1:]
    filled = [t for t in tiles.reshape(-1, 28, 28) if t.max() > 0]
    assert len(filled) >= 10  # after two epochs few clusters hold images yet
    assert all(np.abs(digits - t).max(axis=(1, 2)).min() <= 1 / 255 + 1e-6 for t in filled)
    found = run_readme_example(ckpt, SAMPLE)
    assert found["clusters"].shape == (8,) and torch.equal(found["images"], test.splits["test"][0][:8])
