"""``predict`` writes one CSV row per image: what a user of a clustering tool opens next."""

import csv
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from aae_lightning.merging import MergedClusters
from aae_lightning.runs import checkpoint_run_directory, run_directory


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions/<split>.csv`` into the run the checkpoint came from (else the new run's
    directory), or into ``output_dir``: per image its ``index`` (position in the dataset file),
    ``name`` where the data has file names, ``label`` (empty where unknown), ``cluster`` (the
    argmax of the cluster code) and its ``confidence``, ``merged_cluster`` where the trainer has
    :class:`~aae_lightning.MergedClusters` (the cluster's group, merged from the model's training
    images as at validation), then every code's values (``y_0``, ...).

    CSV because every tool opens it (a spreadsheet, pandas, R) and the table is small (one row per
    image, a few dozen numbers). Under DDP each rank's rows are gathered to rank zero, which writes
    the one file in dataset order. The CLI adds it to every trainer; it acts only in ``predict``.
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        columns = self._columns(predictions)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(columns, gathered, dst=0)
            if not trainer.is_global_zero:
                return
            columns = {k: torch.cat([g[k] for g in gathered]) for k in columns}
        order = columns["index"].argsort()
        columns = {k: v[order] for k, v in columns.items()}
        datamodule = trainer.datamodule
        split = getattr(datamodule, "predict_split", "predict")
        names = datamodule.example_names(split) if hasattr(datamodule, "example_names") else None
        folder = Path(self.output_dir) if self.output_dir else (checkpoint_run_directory(trainer.ckpt_path) or run_directory(trainer))
        path = folder / "predictions" / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        merging = MergedClusters.of(trainer)
        groups = merging.fit_groups(trainer, pl_module).cpu() if merging is not None else None
        self._write(path, columns, pl_module, names, groups)
        print(f"predict: wrote {len(order)} rows to {path}", flush=True)

    @staticmethod
    def _columns(predictions) -> dict[str, torch.Tensor]:
        keys = ["index", "labels", *(f"code/{k}" for k in predictions[0]["codes"])] if predictions else []
        return {k: torch.cat([p["codes"][k.removeprefix("code/")].float() if k.startswith("code/") else p[k] for p in predictions]).cpu()
                for k in keys}

    @staticmethod
    def _write(path: Path, columns: dict[str, torch.Tensor], model, names: list[str] | None, groups: torch.Tensor | None) -> None:
        codes = [c for c in model.codes if f"code/{c.name}" in columns]
        header = ["index", *(["name"] if names else []), "label"]
        if model.cluster_code is not None:
            probs = columns[f"code/{model.cluster_code}"]
            header += ["cluster", "confidence", *(["merged_cluster"] if groups is not None else [])]
            cluster, confidence = probs.argmax(1), probs.max(1).values.tolist()
            merged = groups[cluster].tolist() if groups is not None else None
            cluster = cluster.tolist()
        header += [f"{c.name}_{i}" for c in codes for i in range(c.dim)]
        values = torch.cat([columns[f"code/{c.name}"] for c in codes], dim=1).tolist()
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row, (index, label) in enumerate(zip(columns["index"].tolist(), columns["labels"].tolist())):
                cells = [index, *([names[index]] if names else []), label if label >= 0 else ""]
                if model.cluster_code is not None:
                    cells += [cluster[row], f"{confidence[row]:.6g}", *([merged[row]] if merged is not None else [])]
                writer.writerow(cells + [f"{v:.6g}" for v in values[row]])
