"""The AAE's 2-D map (paper sec. 7) against PCA, t-SNE and UMAP (where installed) on the same test
images: 5-nearest-neighbour accuracy in 2-D (5-fold cross-validation on the embedded test set),
scikit-learn's trustworthiness (5 neighbours), and the seconds to embed 10,000 new images (the
AAE: one encoder pass; PCA: one projection; t-SNE cannot embed new points, so its figure is the
time to fit the test set). The AAE trains first for ``--minutes``; its test purity / error is
printed too.

    python benchmarks/dim_reduction.py --datasets mnist-sample --minutes 10
    python benchmarks/dim_reduction.py --config configs/dim_reduction_semi_2d.yaml --datasets mnist-sample fashion-mnist
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import wandb
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE, trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from aae_lightning.cli import cli_main
from aae_lightning.figures import encode_split, map_coordinates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clustering import DATASETS  # noqa: E402  (the dataset presets of the clustering benchmark)

NEW_IMAGES = 10_000


def scores(name: str, points: np.ndarray, flat: np.ndarray, labels: np.ndarray, seconds: str) -> str:
    knn = cross_val_score(KNeighborsClassifier(5), points, labels, cv=5).mean()
    trust = trustworthiness(flat, points, n_neighbors=5)
    return f"| {name} | {knn:.3f} | {trust:.3f} | {seconds} |"


def aae_map(model, images: torch.Tensor) -> np.ndarray:
    outputs = encode_split(model, images, torch.full((len(images),), -1))
    points, _ = map_coordinates(model, outputs)
    return points.numpy()


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "dim_reduction_2d.yaml"))
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["mnist-sample"])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("cli_args", nargs="*", help="extra CLI arguments, after --")
    opts = parser.parse_args()
    seconds = round(opts.minutes * 60)
    for name in opts.datasets:
        datamodule, folder, extra, where = DATASETS[name]
        if not folder.is_dir():
            print(f"error: {name}: {folder} is missing ({where})", file=sys.stderr)
            sys.exit(2)
        cli = cli_main(["--config", opts.config, f"--data={datamodule}", f"--data.data_dir={folder}", "--data.download=false", *extra,
                        f"--seed_everything={opts.seed}", "--trainer.max_epochs=-1",
                        f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}",
                        "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                        "--model.init_args.figures_every_n_epochs=0", "--trainer.enable_progress_bar=false",
                        "--trainer.enable_model_summary=false", *opts.cli_args], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
        (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
        wandb.finish()
        model = cli.model.cpu().eval()
        train = cli.datamodule.splits["train"][0]
        images, labels = cli.datamodule.splits["test"]
        flat, labels = images.flatten(1).numpy(), labels.numpy()
        new = images.repeat(NEW_IMAGES // len(images) + 1, 1, 1, 1)[:NEW_IMAGES]
        print(f"{name}: {opts.config}, {cli.trainer.current_epoch} epochs in {opts.minutes} minutes, seed {opts.seed}; test "
              + " ".join(f"{k[5:]}={v:.4f}" for k, v in test.items() if k[5:] in ("purity", "acc", "nmi", "error")))
        print(f"| method ({name}, {len(images)} test images) | 5-NN accuracy in 2-D | trustworthiness | seconds to embed {NEW_IMAGES:,} new images |")
        print("|---|---|---|---|")
        _, aae_seconds = timed(lambda: aae_map(model, new))
        print(scores("AAE map W y + z", aae_map(model, images), flat, labels, f"{aae_seconds:.2f}"), flush=True)
        pca = PCA(2, random_state=opts.seed).fit(train.flatten(1).numpy())
        _, pca_seconds = timed(lambda: pca.transform(new.flatten(1).numpy()))
        print(scores("PCA (fit on the training split)", pca.transform(flat), flat, labels, f"{pca_seconds:.2f}"), flush=True)
        points, tsne_seconds = timed(lambda: TSNE(2, random_state=opts.seed, init="pca").fit_transform(flat))
        print(scores("t-SNE", points, flat, labels, f"cannot (fitting the {len(images)} test images: {tsne_seconds:.1f})"), flush=True)
        try:
            import umap
        except ImportError:
            print("| UMAP | not installed (pip install umap-learn) | | |")
        else:
            reducer, umap_fit = timed(lambda: umap.UMAP(random_state=opts.seed).fit(train.flatten(1).numpy()))
            _, umap_seconds = timed(lambda: reducer.transform(new.flatten(1).numpy()))
            print(scores("UMAP (fit on the training split)", reducer.transform(flat), flat, labels, f"{umap_seconds:.2f}"), flush=True)


if __name__ == "__main__":
    main()
