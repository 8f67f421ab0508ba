"""Train a clustering (or semi-supervised) config for an epoch or wall-clock budget and print, per
epoch, the validation purity / Hungarian accuracy / NMI / ARI (and classification error) with the
wall time; then the same on the test set, the test clusters' sizes and those that mix classes
(which digits share clusters: most lost purity is that). With several ``--seeds`` it trains once
per seed and ends with the mean and standard deviation of the test figures: on Fashion-MNIST two
seeds of one config can differ by several points of accuracy, more than most settings change it.

``--datasets`` runs named real datasets one after the other in the same command (each with the
DataModule and split it needs): ``mnist-sample`` (../shared/data/mnist-sample, 2,000 training and
500 validation digits) and ``fashion-mnist`` (Debian's dataset-fashion-mnist, without a digit
config's ``Deskew``), and ends with one summary line per dataset.

    python benchmarks/clustering.py --config configs/clustering.yaml --datasets mnist-sample fashion-mnist --minutes 15 --seeds 0 1 2
    python benchmarks/clustering.py --config configs/clustering.yaml --data-dir DIR --minutes 15
    python benchmarks/clustering.py --config configs/clustering.yaml --data-dir DIR --epochs 30 \
        -- --data=aae_lightning.FashionMNISTDataModule --model.init_args.discriminator_noise=0.1
    python benchmarks/clustering.py --config configs/clustering_fashion.yaml --data-dir DIR --minutes 15 --seeds 0 1 2

Everything after ``--`` goes to the CLI unchanged. The script writes no checkpoints and draws no
figures; ``--trainer.logger=false`` also leaves W&B out. (``--trainer.callbacks=[]`` would drop the
config's own callbacks too, such as its weight averaging.)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import wandb
from lightning.pytorch.callbacks import Checkpoint

from aae_lightning.cli import cli_main, one_line_errors
from aae_lightning.figures import encode_split
from aae_lightning.merging import MergedClusters
from aae_lightning.metrics import contingency_from_labels

# name: (DataModule, folder, its other CLI arguments, how to get the folder where it is missing)
DATASETS = {
    "mnist-sample": ("aae_lightning.MNISTDataModule", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-sample",
                     ["--data.val_size=500"], "it comes with the project's shared/ folder beside the checkout"),
    # without the digit configs' Deskew: clothes have no writer's slant, and deskewing them cost the
    # 2-D map 2-3 points of purity on Fashion-MNIST (docs/experiments.md: "Deskewed digits")
    "fashion-mnist": ("aae_lightning.FashionMNISTDataModule", Path("/usr/share/datasets/fashion-mnist"), ["--data.transform=null"],
                      "install it with: apt-get install dataset-fashion-mnist"),
}
# merged/*: the clusters merged into fewer (MergedClusters), where the config has that callback
COLUMNS = ("purity", "purity_confident", "acc", "nmi", "ari", "clusters_used", "error", "recon_loss", "merged/purity", "merged/acc", "merged/nmi")


# time-to-quality: the levels of the model's headline metric (val/purity up, val/error down)
LEVELS = {"max": (0.7, 0.75, 0.8, 0.85, 0.9, 0.95), "min": (0.2, 0.1, 0.05, 0.02)}


class EpochReport(L.Callback):
    """Per epoch the validation figures against wall time; at the end, when the headline metric
    first reached each level (the figure a user waiting for a useful model feels)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.reached: dict[float, tuple[float, int]] = {}
        print(f"{'epoch':>5} {'wall_s':>8} " + " ".join(f"{c:>16}" for c in COLUMNS), flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        # callbacks' validation hooks run before the module's, which logs the metrics
        m = trainer.callback_metrics
        wall = time.perf_counter() - self.start
        values = " ".join(f"{m[f'val/{c}'].item():>16.4f}" if f"val/{c}" in m else f"{'-':>16}" for c in COLUMNS)
        print(f"{trainer.current_epoch:>5} {wall:>8.1f} {values}", flush=True)
        name, mode = pl_module.monitor_metric()
        if name in m:
            for level in LEVELS[mode]:
                if level not in self.reached and (m[name] >= level if mode == "max" else m[name] <= level):
                    self.reached[level] = (wall, trainer.current_epoch)

    def on_fit_end(self, trainer, pl_module):
        name, mode = pl_module.monitor_metric()
        cells = [f"{'>=' if mode == 'max' else '<='} {level}: " + (f"{self.reached[level][0]:.0f} s (epoch {self.reached[level][1]})"
                 if level in self.reached else "not reached") for level in LEVELS[mode]]
        print(f"time to {name} " + ", ".join(cells), flush=True)


@torch.no_grad()
def cluster_class_counts(model, datamodule) -> list[list[int]]:
    """counts[k][c]: test images of class c in cluster k (the argmax of the cluster code)."""
    images, labels = datamodule.splits["test"][:2]
    probs = encode_split(model, images, labels)[f"code/{model.cluster_code}"]
    # the labels sit on the GPU where the DataModule keeps its splits there (on_device)
    return contingency_from_labels(probs.argmax(1).numpy(), labels.cpu().numpy(), probs.shape[1], datamodule.num_classes).tolist()


def mixed_clusters(counts: list[list[int]], share: float = 0.2) -> str:
    """The clusters whose other classes hold ``share`` of them or more, with the counts of their
    main classes: most lost purity is two classes sharing clusters (4 and 9, say)."""
    cells = []
    for k, row in enumerate(counts):
        if sum(row) and max(row) < (1 - share) * sum(row):
            main = sorted((n, c) for c, n in enumerate(row) if n >= share / 2 * sum(row))[::-1]
            cells.append(f"{k}: " + " + ".join(f"{c}x{n}" for n, c in main) + f" of {sum(row)}")
    return "; ".join(cells) or "none"


def merged_counts(counts: list[list[int]], groups: list[int]) -> list[list[int]]:
    """The rows of ``counts`` summed over the clusters of each group (``groups[k]``: cluster k's)."""
    merged = [[0] * len(counts[0]) for _ in range(max(groups) + 1)]
    for row, g in zip(counts, groups):
        merged[g] = [m + n for m, n in zip(merged[g], row)]
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", help="the config's DataModule reads its files from here")
    data.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), help="named real datasets, run one after the other")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--epochs", type=int)
    budget.add_argument("--minutes", type=float)
    parser.add_argument("--seeds", type=int, nargs="+", help="train once per seed (default: the config's seed)")
    parser.add_argument("cli_args", nargs="*", help="extra CLI arguments, after --")
    opts = parser.parse_args()

    # no figures: they cost time and measure nothing here
    args = ["--config", opts.config, "--data.download=false", "--model.init_args.figures_every_n_epochs=0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if opts.epochs:
        args.append(f"--trainer.max_epochs={opts.epochs}")
    else:
        seconds = round(opts.minutes * 60)
        args += ["--trainer.max_epochs=-1", f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]
    datasets = {opts.data_dir: [f"--data.data_dir={opts.data_dir}"]} if opts.data_dir else {}
    for name in opts.datasets or []:
        datamodule, folder, extra, where = DATASETS[name]
        if not folder.is_dir():
            print(f"error: {name}: {folder} is missing ({where})", file=sys.stderr)
            sys.exit(2)
        datasets[name] = [f"--data={datamodule}", f"--data.data_dir={folder}", *extra]
    summaries = []
    for dataset, data_args in datasets.items():
        results = []
        for seed in opts.seeds or [None]:
            header = f"{dataset} " * bool(opts.datasets) + (f"seed {seed}" if seed is not None else "")
            if header:
                print(header.strip(), flush=True)
            cli = cli_main(args + data_args + opts.cli_args + ([f"--seed_everything={seed}"] if seed is not None else []), run=False)
            # no checkpoints either; the config's other callbacks (weight averaging) stay part of what is measured
            cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, Checkpoint)] + [EpochReport()]
            with one_line_errors():  # as the CLI's own fit: bad input is one line, not a traceback
                cli.trainer.fit(cli.model, cli.datamodule)
                (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
            print("test " + " ".join(f"{c}={test[f'test/{c}']:.4f}" for c in COLUMNS if f"test/{c}" in test), flush=True)
            if cli.model.cluster_code is not None:
                counts = cluster_class_counts(cli.model, cli.datamodule)
                # sizes too: the balance terms and the uniform prior ask for equal ones
                print(f"test cluster sizes, largest first: {' '.join(str(n) for n in sorted(map(sum, counts), reverse=True))}", flush=True)
                print(f"test clusters mixing classes (cluster: class x count, of its size): {mixed_clusters(counts)}", flush=True)
                merging = MergedClusters.of(cli.trainer)
                if merging is not None:
                    # the groups the test scored: the same seeded copies of the same (averaged) weights
                    groups = merging.fit_groups(cli.trainer, cli.model).tolist()
                    members = "; ".join(f"{g}: " + " ".join(str(k) for k, h in enumerate(groups) if h == g) for g in range(merging.num_clusters))
                    print(f"test merged groups (group: its clusters): {members}", flush=True)
                    print(f"test merged groups mixing classes (group: class x count, of its size): {mixed_clusters(merged_counts(counts, groups))}",
                          flush=True)
            wandb.finish()
            results.append(test)
        if len(results) > 1:
            summary = " ".join(f"{c}={statistics.mean(r[f'test/{c}'] for r in results):.4f}+-{statistics.stdev(r[f'test/{c}'] for r in results):.4f}"
                               for c in COLUMNS if f"test/{c}" in results[0])
            summaries.append(f"test over {len(results)} seeds " + f"{dataset} " * bool(opts.datasets) + summary)
    for line in summaries:
        print(line, flush=True)


if __name__ == "__main__":
    main()
