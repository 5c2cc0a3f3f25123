from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (wandb_records)

# W&B never talks to a server in the tests, whatever the machine's settings.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def fresh_distributed_environment(monkeypatch):
    """Each test starts without the MASTER_PORT / MASTER_ADDR a previous ddp_spawn test left in os.environ, so that
    every DDP test picks a free port instead of reusing one that may still be held by the last process group."""
    for key in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    yield


def assert_same_on_every_rank(trainer: pl.Trainer, tensors) -> None:
    """Inside a DDP run: all ranks hold exactly the same values (gathered from every rank and compared)."""
    import torch

    flat = torch.cat([t.detach().flatten().float() for t in tensors])
    gathered = trainer.strategy.all_gather(flat)
    assert gathered.shape[0] == trainer.world_size > 1
    assert all(torch.equal(gathered[0], g) for g in gathered[1:])


def ort_optimized_kernels(path, tmp_path: Path) -> list[str]:
    """The operators of ONNX Runtime's optimised graph of the ONNX file ``path`` (all optimisations, CPU): the
    kernels it actually runs."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def make_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing under tmp_path."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def digits():
    from lightning_compress.tasks import DigitsDataModule

    return DigitsDataModule(batch_size=64, seed=0)


def small_module(width: int = 8, hidden: int = 32, **kwargs):
    from lightning_compress.tasks import ClassificationModule, SmallCNN

    return ClassificationModule(SmallCNN((1, 8, 8), 10, width=width, hidden=hidden), **kwargs)


def qat_steps(model, x, y, steps: int, lr: float = 0.05) -> None:
    """``steps`` SGD steps of cross-entropy on one batch, the model in training mode (BatchNorm statistics moving), then
    evaluation mode: the quickest quantization-aware training a verb user runs before exporting."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


class Logits(nn.Module):
    """A Hugging Face model as a module from token ids to logits (what a LightningModule's forward returns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids).logits


def tiny_gpt2(vocab: int = 64, tokens: int = 16):
    """GPT-2 (Hugging Face, random weights) from a tiny config, as ids → logits: 2 blocks of 4 Conv1D layers, a
    tied lm_head."""
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=tokens, n_embd=32, n_layer=2, n_head=2)
    config.bos_token_id = config.eos_token_id = 0
    return Logits(transformers.GPT2LMHeadModel(config))
