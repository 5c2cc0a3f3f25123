"""KnowledgeDistillation: teacher–student distillation on an unmodified LightningModule.

Lightning callbacks cannot return a new loss (``on_before_backward`` ignores its return value, on purpose), so the
callback wraps the module's ``training_step`` for the duration of ``fit``: the user's step runs unchanged, its
forward call is observed (input and output), the teachers run on the same input, and the step's loss is replaced by
``(1 − alpha) · task + alpha · T² · KL``. Modules whose step cannot be wrapped call :meth:`KnowledgeDistillation.loss`
themselves (``wrap_training_step=False``). The mathematics is in :mod:`~lightning_compress.core.losses`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_compress.core.checks import check_flag, check_number
from lightning_compress.core.configs import DistillationConfig
from lightning_compress.core.losses import blend, distillation_loss, feature_loss
from lightning_compress.core.metrics import agreement
from lightning_compress.distillation.teachers import build_teacher, fingerprint, freeze, spec_name

TeacherSpec = nn.Module | Mapping[str, Any]
ADAPTERS = "_kd_adapters"  # where the feature adapters live on the student while it trains (never in its checkpoint)


def _names(modules: Mapping[str, nn.Module], limit: int = 15) -> str:
    names = [repr(n) for n in modules if n]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _as_input_of(teacher: nn.Module, x: Any) -> Any:
    """``x`` in the teacher's floating-point dtype: under ``precision="bf16-true"`` / ``"16-true"`` the student's
    inputs are half precision while the teacher keeps its own (it is never cast, so it ends ``fit`` bit-identical)."""
    dtype = next((p.dtype for p in teacher.parameters() if p.is_floating_point()), None)
    if isinstance(x, Tensor) and x.is_floating_point() and dtype is not None and x.dtype != dtype:
        return x.to(dtype)
    return x


def _feature_size(module: nn.Module, owner: str, name: str) -> tuple[int, bool]:
    """Channels of a module's output and whether it is a conv-style (N, C, ...) feature map."""
    for attr, spatial in (("out_channels", True), ("num_features", True), ("out_features", False)):
        if hasattr(module, attr):
            if isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)):
                spatial = False
            return int(getattr(module, attr)), spatial
    raise ValueError(
        f"cannot tell the feature size of the {owner}'s module {name!r} ({type(module).__name__}); pair Conv, Linear "
        "or BatchNorm modules."
    )


class KnowledgeDistillation(Callback):
    r"""Distil one or several frozen teachers into the LightningModule being trained.

    Loss: ``(1 − alpha) · task + alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` (Hinton et al. 2015),
    the KL term in float32 under mixed precision. ``alpha=1`` is pure distillation: the labels play no part. With
    several teachers the KL terms are averaged with ``teacher_weights``.

    The student's ``training_step`` must call the module's forward (``self(x)``) and return a loss tensor or a dict
    with ``"loss"``; nothing in the module changes. The teachers stay in evaluation mode with frozen parameters,
    outside every optimizer, on the student's device, run without an autograd graph, are not stored in the
    student's checkpoint (their identity is: class, checkpoint path, SHA-256 of the weights) and end ``fit`` with
    bit-identical weights and BatchNorm statistics.

    Teachers given as modules are frozen (and their checkpoints loaded) at once; teachers given as configs are built
    when ``fit`` starts (``setup``) or by :meth:`build_teachers`, so that building the callback, a recipe that holds
    it or :func:`~lightning_compress.load_recipe` never trains or loads anything.

    Args:
        teacher: An ``nn.Module`` (a LightningModule too), a config with ``_target_``, or a list of them.
        temperature: Softmax temperature T (> 0).
        alpha: Weight of the distillation term in [0, 1].
        teacher_checkpoint: A checkpoint to load into the teacher (a list: one per teacher, ``None`` to skip).
        teacher_weights: Weights of the teachers' KL terms (normalised to sum 1).
        cache_teacher_outputs: Keep the teachers' outputs per sample and skip their forward once every sample of a
            batch is known (from the second epoch on). Samples are keyed by a hash of their bytes, so shuffling is
            fine; augmentation is not (an augmented sample is a new sample, and the cache would only grow). The
            cache lives on the student's device.
        cache_dir: With ``cache_teacher_outputs``, a directory where the cache is stored when ``fit`` ends and
            read when it starts, keyed by the teachers' weights (SHA-256), so that later runs with the same teachers
            skip their forward from the first epoch (the app sets a sweep's ``stages`` directory). A stored cache
            that does not read back is recomputed with a warning.
        wrap_training_step: Wrap the module's ``training_step`` (default). ``False``: call :meth:`loss` yourself.
        feature_pairs: Feature (hint) distillation, FitNets-style: ``{student module name: teacher module name}`` (the
            first teacher's). Each student feature passes a learned adapter (1×1 conv or linear, where the channel
            counts differ) and is pulled towards the teacher's by mean squared error, weighted by ``feature_weight``
            and logged as ``kd/loss_feature``. The adapters train with the student (they are in its optimizer while
            it trains) and are removed from it after ``fit``; they are saved in this callback's state in the
            checkpoint, not in the student's ``state_dict``, and restored from there on resume.
        feature_weight: Weight of the feature loss.

    Example::

        teacher = MyBigNet.load_from_checkpoint("teacher.ckpt")
        trainer = pl.Trainer(callbacks=[KnowledgeDistillation(teacher, temperature=4.0, alpha=0.9)])
        trainer.fit(small_student, datamodule)
    """

    def __init__(
        self,
        teacher: TeacherSpec | Sequence[TeacherSpec],
        temperature: float = 4.0,
        alpha: float = 0.5,
        teacher_checkpoint: str | os.PathLike | Sequence[str | os.PathLike | None] | None = None,
        teacher_weights: Sequence[float] | None = None,
        cache_teacher_outputs: bool = False,
        cache_dir: str | os.PathLike | None = None,
        wrap_training_step: bool = True,
        feature_pairs: Mapping[str, str] | None = None,
        feature_weight: float = 1.0,
    ) -> None:
        super().__init__()
        #: How the student learns (checked there, as distillation_loss takes it); the callback adds the teachers.
        self.config = DistillationConfig(temperature=temperature, alpha=alpha, feature_weight=feature_weight)
        self.temperature, self.alpha = self.config.temperature, self.config.alpha
        specs = (
            list(teacher) if isinstance(teacher, Sequence) and not isinstance(teacher, (str, nn.Module)) else [teacher]
        )
        if not specs:
            raise ValueError("`teacher` is an empty list.")
        for spec in specs:
            spec_name(spec)  # refuses what is neither a module nor a config with _target_, at once
        if teacher_checkpoint is None or isinstance(teacher_checkpoint, (str, os.PathLike)):
            checkpoints: list[Any] = [teacher_checkpoint] * len(specs) if len(specs) == 1 else [None] * len(specs)
            if teacher_checkpoint is not None and len(specs) > 1:
                raise ValueError(
                    "With several teachers, `teacher_checkpoint` must be a list with one entry per teacher."
                )
        else:
            checkpoints = list(teacher_checkpoint)
            if len(checkpoints) != len(specs):
                raise ValueError(f"`teacher_checkpoint` has {len(checkpoints)} entries for {len(specs)} teachers.")
        self._specs: list[Any] = specs
        self._checkpoints = [None if c is None else os.fspath(c) for c in checkpoints]
        weights = [1.0] * len(specs) if teacher_weights is None else list(teacher_weights)
        message = f"`teacher_weights` must hold {len(specs)} finite non-negative numbers with a positive sum"
        if len(weights) != len(specs):
            raise ValueError(f"{message}, got {teacher_weights!r}.")
        for w in weights:
            check_number("teacher_weights", w, 0, what=f"{len(specs)} finite non-negative numbers with a positive sum")
        if sum(weights) <= 0:
            raise ValueError(f"{message}, got {teacher_weights!r}.")
        self.teacher_weights = [float(w) / sum(weights) for w in weights]
        self.cache_teacher_outputs = check_flag("cache_teacher_outputs", cache_teacher_outputs)
        if cache_dir is not None and not self.cache_teacher_outputs:
            raise ValueError("`cache_dir` stores the teacher-output cache: set cache_teacher_outputs=True with it.")
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.wrap_training_step = check_flag("wrap_training_step", wrap_training_step)
        self.feature_pairs = {str(s): str(t) for s, t in dict(feature_pairs or {}).items()}
        self.feature_weight = self.config.feature_weight
        if self.feature_pairs and self.cache_teacher_outputs:
            raise ValueError(
                "`cache_teacher_outputs` skips the teacher's forward, which feature distillation (`feature_pairs`) "
                "needs every step: use one or the other."
            )
        self._teachers: list[nn.Module] | None = None
        if all(isinstance(spec, nn.Module) for spec in specs):
            self.build_teachers()  # cheap (freeze, load a checkpoint): a teacher that does not load stops at once
        self._features: dict[str, Tensor] = {}
        self._teacher_features: dict[str, Tensor] = {}
        self._feature_hooks: list[Any] = []
        self._load_hook: Any = None
        self._adapters: nn.ModuleDict | None = None
        self._cache: dict[tuple[float, ...], int] = {}  # sample key -> row of _cache_values
        self._cache_values: Tensor | None = None  # [samples, teachers, outputs]
        self._projection: Tensor | None = None
        self._original_step: Any = None
        self._hook: Any = None
        self._seen: list[tuple[Any, Any]] = []
        self._checked_shapes = False
        self._means: dict[str, MeanMetric] = {}

    def build_teachers(self) -> list[nn.Module]:
        """Build the teachers (configs instantiated, checkpoints loaded, frozen) if not done yet, and return them.

        Raises:
            ValueError: A checkpoint does not exist or does not load, a config builds no module, or a
                ``feature_pairs`` teacher module does not exist.
        """
        if self._teachers is None:
            teachers = [freeze(build_teacher(t, c)) for t, c in zip(self._specs, self._checkpoints, strict=True)]
            teacher_modules = dict(teachers[0].named_modules())
            for student_name, teacher_name in self.feature_pairs.items():
                if teacher_name not in teacher_modules:
                    raise ValueError(
                        f"`feature_pairs[{student_name!r}]`: the teacher has no module {teacher_name!r}. "
                        f"Candidates: {_names(teacher_modules)}."
                    )
            self._teachers = teachers
        return self._teachers

    @property
    def teachers(self) -> list[nn.Module]:
        """The frozen teachers (built by :meth:`build_teachers`, which ``setup`` calls when ``fit`` starts)."""
        if self._teachers is None:
            raise RuntimeError(
                "KnowledgeDistillation: the teachers given as configs are built when fit starts (setup); call "
                "build_teachers() to build them before."
            )
        return self._teachers

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(teachers=[spec_name(t) for t in self._specs], checkpoints=self._checkpoints)

    # ------------------------------------------------------------------ the loss, for explicit use too
    @torch.no_grad()
    def teacher_logits(self, x: Any) -> list[Tensor]:
        """The teachers' outputs for the student's input ``x`` (cached per sample when enabled)."""
        if self.cache_teacher_outputs and isinstance(x, Tensor):
            keys = self._sample_keys(x)
            rows = [self._cache.get(k) for k in keys]
            if self._cache_values is not None and all(r is not None for r in rows):
                cached = self._cache_values.index_select(0, torch.tensor(rows, device=self._cache_values.device))
                return list(cached.to(x.device).unbind(1))
            outputs = [t(_as_input_of(t, x)).float() for t in self.teachers]
            stacked = torch.stack(outputs, dim=1).detach()
            start = self._cache_values.shape[0] if self._cache_values is not None else 0
            self._cache_values = stacked if self._cache_values is None else torch.cat([self._cache_values, stacked])
            self._cache.update((k, start + i) for i, k in enumerate(keys))
            return outputs
        return [t(_as_input_of(t, x)).float() for t in self.teachers]

    def _sample_keys(self, x: Tensor) -> list[tuple[float, ...]]:
        # A sample's key: two random projections of its values, in float64 — computed for the whole batch in one
        # matrix product (per-sample hashing in Python cost more than the student's step). Equal samples give equal
        # keys; distinct real inputs colliding on both projections would need a measure-zero coincidence.
        flat = x.detach().flatten(1).double()
        if self._projection is None or self._projection.shape[0] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            self._projection = torch.randn(flat.shape[1], 2, generator=generator, dtype=torch.float64)
        return [tuple(row) for row in (flat @ self._projection.to(flat.device)).tolist()]

    def loss(self, pl_module: pl.LightningModule, student_logits: Tensor, x: Any, task_loss: Tensor | None) -> Tensor:
        """``(1 − alpha) · task_loss + alpha · KD``, logged under ``kd/``. Call it from ``training_step`` when the
        step cannot be wrapped (``wrap_training_step=False``)."""
        teacher_outputs = self.teacher_logits(x)
        if not self._checked_shapes:
            for i, t in enumerate(teacher_outputs):
                if t.shape != student_logits.shape:
                    raise ValueError(
                        f"teacher {i} ({type(self.teachers[i]).__name__}) and student outputs differ in shape on the "
                        f"first batch: student {tuple(student_logits.shape)}, teacher {tuple(t.shape)}."
                    )
            self._checked_shapes = True
        distill = distillation_loss(student_logits, teacher_outputs, None, self.config, self.teacher_weights)
        total = blend(distill, task_loss, self.alpha)
        metrics = {"kd/loss_kd": distill.detach()}
        if task_loss is not None:
            metrics["kd/loss_task"] = task_loss.detach()
        if self.feature_pairs:
            hint = self._feature_loss(pl_module)
            total = total + self.feature_weight * hint
            metrics["kd/loss_feature"] = hint.detach()
        self._record(pl_module, metrics, lambda: agreement(student_logits.detach(), teacher_outputs[0]))
        return total

    def _feature_loss(self, pl_module: pl.LightningModule) -> Tensor:
        adapters = getattr(pl_module, ADAPTERS)
        losses = []
        for student_name, teacher_name in self.feature_pairs.items():
            if student_name not in self._features or teacher_name not in self._teacher_features:
                raise RuntimeError(
                    f"KnowledgeDistillation: no feature was recorded for the pair {student_name!r} -> {teacher_name!r} "
                    "in this step (is the module used in the forward?)."
                )
            adapted = adapters[student_name.replace(".", "__")](self._features.pop(student_name))
            losses.append(feature_loss(adapted, self._teacher_features.pop(teacher_name)))
        return torch.stack(losses).mean()

    def _attach_features(self, pl_module: pl.LightningModule) -> None:
        student_modules = dict(pl_module.named_modules())
        teacher_modules = dict(self.teachers[0].named_modules())
        adapters = nn.ModuleDict()
        for student_name, teacher_name in self.feature_pairs.items():
            if student_name not in student_modules:
                raise ValueError(
                    f"`feature_pairs`: the student has no module {student_name!r}. "
                    f"Candidates: {_names(student_modules)}."
                )
            s_size, s_spatial = _feature_size(student_modules[student_name], "student", student_name)
            t_size, t_spatial = _feature_size(teacher_modules[teacher_name], "teacher", teacher_name)
            if s_size == t_size:
                adapter: nn.Module = nn.Identity()
            elif s_spatial:
                adapter = nn.Conv2d(s_size, t_size, kernel_size=1, bias=False)
            else:
                adapter = nn.Linear(s_size, t_size, bias=False)
            adapters[student_name.replace(".", "__")] = adapter.to(next(pl_module.parameters()).device)

            def keep(store: dict[str, Tensor], key: str, only_training: bool) -> Any:
                def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                    if not only_training or (module.training and torch.is_grad_enabled()):
                        store[key] = output

                return hook

            self._feature_hooks += [
                student_modules[student_name].register_forward_hook(keep(self._features, student_name, True)),
                teacher_modules[teacher_name].register_forward_hook(keep(self._teacher_features, teacher_name, False)),
            ]
        # On the student, so that the optimizer and DDP see the adapters; kept out of its checkpoints (they travel in
        # this callback's state instead: see state_dict / load_state_dict).
        pl_module.add_module(ADAPTERS, adapters)
        self._adapters = adapters

        def adapters_are_not_the_students(module: nn.Module, incompatible: Any) -> None:
            # A checkpoint's state dict never holds the adapters; load_state_dict below restores them.
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(ADAPTERS + ".")]

        self._load_hook = pl_module.register_load_state_dict_post_hook(adapters_are_not_the_students)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(ADAPTERS + ".")]:
            del state[key]  # the student's own state dict stays its class's; the adapters are in state_dict() below

    def _record(self, pl_module: pl.LightningModule, metrics: dict[str, Tensor], agreement_fn: Any) -> None:
        # Lightning's self.log costs about a millisecond per key — more than a small student's whole step — so the
        # losses are summed here and logged as they are only on the Trainer's logging steps, and as epoch means at
        # the end of the epoch (kd/<name>_epoch). The teacher agreement is measured on the logging steps only (its
        # epoch mean is over those steps).
        trainer = pl_module._trainer
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        logging_step = trainer is not None and (trainer.global_step + 1) % every == 0
        if logging_step:
            metrics["kd/teacher_agreement"] = agreement_fn()
        for key, value in metrics.items():
            if key not in self._means:
                self._means[key] = MeanMetric().to(value.device)
            self._means[key].update(value)
        if logging_step:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._original_step is not None or hasattr(pl_module, ADAPTERS):
            return
        if self.wrap_training_step and not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation(wrap_training_step=True) changes the loss that training_step returns, which "
                "Lightning ignores under manual optimization (automatic_optimization=False): the distillation would "
                "have no effect. Set wrap_training_step=False and use kd.loss(self, logits, x, task_loss) as the loss "
                "you pass to self.manual_backward."
            )
        self.build_teachers()
        if self.cache_dir is not None and trainer.is_global_zero and not self._cache:
            self._load_cache()
        if self.feature_pairs:
            self._attach_features(pl_module)
        if not self.wrap_training_step:
            return
        original = pl_module.training_step
        seen = self._seen

        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if module.training and torch.is_grad_enabled():
                seen.append((args[0] if args else None, output))

        def training_step(*args: Any, **kwargs: Any) -> Any:
            seen.clear()
            result = original(*args, **kwargs)
            if not seen:
                raise RuntimeError(
                    "KnowledgeDistillation: the training_step did not call the module's forward (self(x)), so there "
                    "is no student output to distil into. Call self(x) in training_step, or set "
                    "wrap_training_step=False and add callback.loss(self, logits, x, task_loss) yourself."
                )
            x, logits = seen[-1]
            task = result["loss"] if isinstance(result, Mapping) else result
            total = self.loss(pl_module, logits, x, None if self.alpha == 1.0 else task)
            if isinstance(result, Mapping):
                return {**result, "loss": total}
            return total

        self._hook = pl_module.register_forward_hook(record)
        self._original_step = original
        pl_module.training_step = training_step  # type: ignore[method-assign]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for teacher in self.teachers:
            teacher.to(pl_module.device)
        if self._cache_values is not None:
            self._cache_values = self._cache_values.to(pl_module.device)  # a cache read from disk is on the CPU

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in self._means.values():
            metric.reset()
        for teacher in self.teachers:
            teacher.eval()  # belt and braces: the teachers are not children of the module, train() never reaches them

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # MeanMetric.compute() averages over every rank under DDP (torchmetrics syncs its state).
        means = {f"{k}_epoch": metric.compute() for k, metric in self._means.items() if metric.update_count}
        if means:
            pl_module.log_dict(means, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ the teacher-output cache on disk
    def _cache_key(self) -> dict[str, Any]:
        return {"teachers": [fingerprint(t) for t in self.teachers], "keys": "projection-seed-0"}

    def _load_cache(self) -> None:
        from lightning_compress.core.cache import StageCache

        def read(path: Any) -> int:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            keys, values = stored["keys"], stored["values"]
            if keys.shape[0] != values.shape[0] or keys.dtype != torch.float64:
                raise ValueError(f"{keys.shape[0]} keys for {values.shape[0]} rows")
            self._cache = {tuple(row): i for i, row in enumerate(keys.tolist())}
            self._cache_values = values
            return len(self._cache)

        assert self.cache_dir is not None
        StageCache(self.cache_dir).load("teacher-outputs", self._cache_key(), read, ".pt")

    def _store_cache(self) -> None:
        from lightning_compress.core.cache import StageCache

        if self._cache_values is None or not self._cache:
            return
        keys = torch.tensor(list(self._cache), dtype=torch.float64)
        rows = torch.tensor(list(self._cache.values()))
        stored = {"keys": keys, "values": self._cache_values.index_select(0, rows.to(self._cache_values.device)).cpu()}
        assert self.cache_dir is not None
        StageCache(self.cache_dir).store("teacher-outputs", self._cache_key(), lambda p: torch.save(stored, p), ".pt")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cache_dir is not None and trainer.is_global_zero:
            self._store_cache()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._original_step is not None:
            del pl_module.training_step  # the instance attribute goes; the class's method is back
            self._original_step = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for hook in self._feature_hooks:
            hook.remove()
        self._feature_hooks = []
        if hasattr(pl_module, ADAPTERS):
            delattr(pl_module, ADAPTERS)  # the adapters are not part of the exported student
        self._adapters = None
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "teachers": [
                {"class": f"{type(t).__module__}.{type(t).__qualname__}", "checkpoint": c, "sha256": fingerprint(t)}
                for t, c in zip(self.teachers, self._checkpoints, strict=True)
            ],
            "temperature": self.temperature,
            "alpha": self.alpha,
        }
        if self._adapters is not None:
            state["adapters"] = {k: v.detach().cpu() for k, v in self._adapters.state_dict().items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._adapters is not None and "adapters" in state_dict:
            self._adapters.load_state_dict(state_dict["adapters"], strict=True)
        saved = [t.get("sha256") for t in state_dict.get("teachers", [])]
        current = [fingerprint(t) for t in self.build_teachers()]
        if saved and saved != current:
            raise ValueError(
                "KnowledgeDistillation: the checkpoint was trained with other teacher weights "
                f"(sha256 {saved}) than the ones given now ({current})."
            )
