"""Building, freezing and identifying a distillation teacher (for :class:`KnowledgeDistillation`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.instantiate import instantiate


def spec_name(teacher: Any) -> str:
    """A short name of a teacher given as a module (its class) or a config (its ``_target_``).

    Raises:
        ValueError: A mapping without ``_target_``.
        TypeError: Neither a module nor a mapping.
    """
    if isinstance(teacher, nn.Module):
        return type(teacher).__name__
    if isinstance(teacher, Mapping):
        if "_target_" not in teacher:
            raise ValueError(f"`teacher` config needs a `_target_`, got keys {sorted(teacher)}.")
        return str(teacher["_target_"]).rpartition(".")[2]
    raise TypeError(f"`teacher` must be an nn.Module or a config with `_target_`, got {type(teacher).__name__}.")


def build_teacher(teacher: nn.Module | Mapping[str, Any], checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The teacher module: an instance, or built from a config with ``_target_``; then ``checkpoint`` loaded.

    A checkpoint may be a Lightning checkpoint (its ``state_dict``) or a plain state dict; it must load with
    ``strict=True``.

    Raises:
        ValueError: The config has no ``_target_``, or the checkpoint does not exist or does not load.
    """
    if isinstance(teacher, nn.Module):
        module = teacher
    elif isinstance(teacher, Mapping):
        if "_target_" not in teacher:
            raise ValueError(f"`teacher` config needs a `_target_`, got keys {sorted(teacher)}.")
        module = instantiate(dict(teacher))
        if not isinstance(module, nn.Module):
            raise ValueError(f"`teacher` config built a {type(module).__name__}, not an nn.Module.")
    else:
        raise TypeError(f"`teacher` must be an nn.Module or a config with `_target_`, got {type(teacher).__name__}.")
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise ValueError(f"teacher checkpoint {path!r} does not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, Mapping) else state
            module.load_state_dict(state, strict=True)
        except Exception as err:  # noqa: BLE001 - any failure is reported as "does not load", with its reason
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"teacher checkpoint {path!r} does not load into {type(module).__name__}: {reason}"
            ) from None
    return module


def freeze(teacher: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients: the teacher never trains and its BatchNorm statistics never move."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's state dict (names and values): identifies it in the student's checkpoint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
