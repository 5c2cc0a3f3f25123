"""A new technique is a config, an update and an apply: the bases give it the ramp, selection with the frozen-layer
policy, checkpoints, restore and the coordination with the other techniques. This test writes one (weights snapped to
a grid that coarsens along the ramp) in the lines the README shows, and checks that it gets all of that for free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from conftest import make_trainer, small_module
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import QuantizationAwareTraining
from lightning_compress.core.checks import check_number
from lightning_compress.core.configs import TechniqueConfig, technique_config
from lightning_compress.core.protocol import ChangesStructure, HasTarget, Restorable
from lightning_compress.core.selection import weights_of
from lightning_compress.tasks import DigitsDataModule
from lightning_compress.trainer.technique import RampedTechnique


# --------------------------------------------------------------------------- the whole technique
@technique_config
class GridConfig(TechniqueConfig):
    step: float = 0.05  # the grid's spacing at the end of the ramp
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.step = float(check_number("step", self.step, 0, low_open=True))


class GradualGrid(RampedTechnique):
    def __init__(self, step: float = 0.05, start_epoch: float = 0, end_epoch: float = 1, **kwargs: Any) -> None:
        super().__init__(GridConfig(step=step, **kwargs), start_epoch, end_epoch, "linear", None, False)
        self.grid = 0.0

    def _goal(self) -> str:
        return f"step={self.config.step:g}"

    def _prepare(self, trainer, pl_module) -> None:
        self.weights = weights_of(self.select(pl_module))

    def _update(self, trainer, step: int) -> None:
        self.grid = self.config.step * self.ramp_progress(step)

    @torch.no_grad()
    def _apply(self) -> None:
        for weight in self.weights.values():
            if self.grid > 0:
                weight.copy_(torch.round(weight / self.grid) * self.grid)

    def state_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "last_update_step": self._last_update_step, "end_step": self._end_step}

    def _restore(self, state: dict[str, Any]) -> None:
        self.grid, self._last_update_step = float(state["grid"]), int(state["last_update_step"])


# --------------------------------------------------------------------------- what it gets for free
def on_grid(weight: torch.Tensor, grid: float) -> bool:
    return bool(torch.allclose(weight, torch.round(weight / grid) * grid, atol=1e-6))


def test_a_new_technique_gets_the_ramp_checks_protocols_and_restore(tmp_path):
    with pytest.raises(ValueError, match=r"`step` must be a finite number > 0, got -1"):
        GradualGrid(step=-1)
    with pytest.raises(ValueError, match=r"GridConfig has no field 'stp' \(did you mean 'step'\?\)"):
        GridConfig(stp=1)  # type: ignore[call-arg]
    technique = GradualGrid(step=0.05, end_epoch=2, exclude="classifier.3")
    qat = QuantizationAwareTraining(calibration_steps=0)  # starts when the grid is final, by the protocol alone
    assert isinstance(technique, ChangesStructure | HasTarget | Restorable)
    module = small_module()
    module.net.features[0].weight.requires_grad_(False)  # the one frozen-layer policy: left as it is, named
    frozen = module.net.features[0].weight.detach().clone()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, callbacks=[technique, qat, checkpoint], max_epochs=3, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"GradualGrid leaves 1 frozen layer\(s\) .* 'net.features.0'"):
        trainer.fit(module, DigitsDataModule(seed=0))
    assert technique.target_reached and technique.grid == pytest.approx(0.05)
    assert technique.structure_final_epoch == 2.0 and qat._steps["start"] == technique._end_step
    assert "net.classifier.3" not in technique.weights and "net.features.0" not in technique.weights
    assert on_grid(module.net.classifier[1].weight, 0.05) and on_grid(module.net.features[3].weight, 0.05)
    assert not on_grid(module.net.classifier[3].weight, 0.05)  # excluded
    assert torch.equal(module.net.features[0].weight, frozen)
    # restore in a process that did not train: a fresh callback reads its state from the checkpoint
    fresh = GradualGrid(step=0.05, end_epoch=2, exclude="classifier.3")
    fresh.restore(trainer, module, checkpoint.last_model_path)
    assert fresh.grid == pytest.approx(0.05) and fresh.target_reached
