"""The pure core: tensor and module code with no Lightning, no Hydra, no rich, no W&B.

Masks and schedules (pruning), fake quantizers, distillation losses, module selection, argument checks, metrics
and the protocol through which the callbacks coordinate. Everything above (callbacks, export, analysis, apps) is
built on these; nothing here imports upwards (``tests/test_layers.py`` enforces it).
"""
