"""Hydra plugin of lightning-compress: the ``recipe`` config group read from the package that holds the recipes.

The recipe files live in ``recipes/`` at the top of the repository (the only copy), shipped in the wheel as the
package ``lightning_compress.recipes``. A Hydra config group is a folder named after the group, which ``recipes/`` is
not; this config source presents the files of a package as the group ``recipe``, so that the app's search path entry
``recipes://lightning_compress.recipes`` makes ``recipe=<name>`` pick ``recipes/<name>.yaml`` in a checkout, an
editable install and an installed wheel alike, without a copy or a link. :class:`RecipesSearchPath` adds that entry
to the search path of any Hydra app whose primary configs are lightning-compress's (``pkg://lightning_compress.conf``:
the two apps and :func:`lightning_compress.apps.config.compose`); an app of your own that puts
``pkg://lightning_compress.conf`` in its ``hydra.searchpath`` adds ``recipes://lightning_compress.recipes`` beside it
to use the recipes. Hydra loads plugins from the ``hydra_plugins`` package, hence this module (it imports only Hydra).
"""

from __future__ import annotations

from hydra._internal.core_plugins.importlib_resources_config_source import ImportlibResourcesConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "recipe"
CONFIGS = "pkg://lightning_compress.conf"
RECIPES = "recipes://lightning_compress.recipes"


def recipe_names(package: str) -> list[str]:
    """The names of the recipes a package holds: its YAML files, without the extension, sorted."""
    from importlib import resources

    return sorted(f.name[: -len(".yaml")] for f in resources.files(package).iterdir() if f.name.endswith(".yaml"))


class RecipesSearchPath(SearchPathPlugin):
    """Puts the recipes on the search path of an app whose primary configs are lightning-compress's."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        paths = [element.path for element in search_path.get_path()]
        if CONFIGS in paths and RECIPES not in paths:
            search_path.append(provider="lightning-compress", path=RECIPES)


class RecipesConfigSource(ImportlibResourcesConfigSource):
    """The YAML files of a package as the config group ``recipe`` (``recipes://<package>``)."""

    @staticmethod
    def scheme() -> str:
        return "recipes"

    @staticmethod
    def _in_group(config_path: str) -> str | None:
        """The file's path inside the package for a path inside the group, ``""`` for the group itself."""
        path = config_path.strip("/")
        if path == GROUP:
            return ""
        return path[len(GROUP) + 1 :] if path.startswith(GROUP + "/") else None

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._in_group(self._normalize_file_name(config_path))
        if not inner:
            raise ConfigLoadError(f"Config not found : {config_path}")
        return super().load_config(inner)

    def available(self) -> bool:
        try:
            return self._files().is_dir()
        except (ValueError, ModuleNotFoundError, TypeError):
            return False

    def _files(self):  # type: ignore[no-untyped-def]
        from importlib import resources

        return resources.files(self.path)

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return True  # the root holds the group
        inner = self._in_group(config_path)
        return inner is not None and (inner == "" or super().is_group(inner))

    def is_config(self, config_path: str) -> bool:
        inner = self._in_group(config_path)
        return bool(inner) and super().is_config(inner)  # type: ignore[arg-type]

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if self._in_group(config_path) != "" or results_filter not in (None, ObjectType.CONFIG):
            return []  # the group holds configs only
        return recipe_names(self.path)
