"""Compression from LightningCLI: the callbacks are configured in the YAML, like any Lightning callback.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --help        # every callback argument, choices listed

The model is the project's small CNN on the embedded digits; put your own LightningModule and DataModule here.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_compress.tasks import ClassificationModule, DigitsDataModule, SmallCNN


class DigitsCNN(ClassificationModule):
    """The small CNN on 8×8 digits, with LightningCLI-friendly arguments."""

    def __init__(self, width: int = 16, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__(SmallCNN((1, 8, 8), 10, width=width, hidden=hidden), lr=lr)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsCNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
