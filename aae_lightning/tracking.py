"""W&B tracking: online with credentials, offline without, and the resolved config in every run."""

import netrc
import os
from pathlib import Path

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def choose_wandb_mode() -> str:
    """Sets WANDB_MODE=offline when no credentials exist, so W&B never prompts for a login.

    A WANDB_MODE the user set always wins. Returns the mode in force.
    """
    if "WANDB_MODE" not in os.environ and not has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def announce_offline(loggers) -> None:
    """Says where an offline W&B run goes, once the trainer holds a W&B logger: a run without
    one (``--trainer.logger=false``, another logger) has nothing to say about W&B."""
    if os.environ.get("WANDB_MODE") == "offline" and not has_wandb_credentials():
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            rank_zero_info("W&B: no credentials found, logging offline under the logger's save_dir; upload later with `wandb sync DIR`")


def keep_checkpoints_local_offline(loggers) -> None:
    """``log_model`` uploads checkpoints as W&B artifacts; offline there is nowhere to upload."""
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._log_model:
            logger._log_model = False
            print("W&B: offline, so log_model is ignored; checkpoints stay in the local checkpoint directory")


def make_wandb_save_dirs(loggers) -> None:
    """wandb looks for the git repository from the logger's save_dir and warns "git root ... does
    not exist" when a first run in a folder has not made it yet; make it before the run starts."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.save_dir:
            Path(logger.save_dir).mkdir(parents=True, exist_ok=True)


def drop_deprecated_wandb_settings(loggers) -> None:
    """Lightning's WandbLogger passes ``anonymous=None`` to ``wandb.init`` even when unset, and
    wandb (0.31) warns at every start that the setting has no effect; leave it out unless set."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
            logger._wandb_init.pop("anonymous", None)


def continue_wandb_run(loggers, run_id: str | None) -> None:
    """Points the (not yet started) W&B logger at the run a checkpoint came from, so a resumed fit
    logs into the same run id instead of starting a new one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and run_id:
            if logger._experiment is not None:
                raise RuntimeError("the W&B run started before the checkpoint was read")
            # WandbLogger takes the id only in its constructor; it passes _wandb_init to wandb.init
            logger._wandb_init.update(id=run_id, resume="allow")
            logger._id = run_id


class SaveConfigToRun(SaveConfigCallback):
    """Saves the resolved config into the run's own directory and the W&B run config, and keeps
    the W&B run id in checkpoints so that a resumed fit continues that run.

    LightningCLI's default writes ``config.yaml`` into ``trainer.log_dir``, which for W&B is the
    shared save dir, so a second run there would fail on the existing file.
    """

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)
        self.wandb_run_id: str | None = None

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.wandb_run_id} if self.wandb_run_id else {}

    def save_config(self, trainer, pl_module, stage):
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                self.wandb_run_id = run.id
                run.config.update(yaml.safe_load(text), allow_val_change=True)
                # wandb owns files/config.yaml; ours goes beside it and is uploaded with the run
                Path(run.dir, "lightning_config.yaml").write_text(text)


def checkpoint_wandb_run_id(checkpoint: dict) -> str | None:
    return checkpoint.get("callbacks", {}).get(SaveConfigToRun.__qualname__, {}).get("wandb_run_id")
