"""The shipped recipes: one YAML file each, the only copy (the app's config group ``recipe``, ``load_recipe``).

A Python package only so that the wheel ships the files as ``lightning_compress.recipes`` and Hydra finds them there
(``recipes://lightning_compress.recipes``, a config source of ``hydra_plugins.lightning_compress_recipes``).
"""
