"""W&B wiring of the apps: one run per job, runs of a multirun grouped by their sweep directory."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def sweep_group(logger_cfg: DictConfig) -> dict[str, Any]:
    """In a multirun, W&B runs without a group of their own are grouped by the sweep directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("group") is not None:
        return {}
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    return {"group": HydraConfig.get().sweep.dir}


def finish_wandb_run() -> None:
    """Finish the W&B run a job started: one run per job, also in multiruns and when a job fails."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
