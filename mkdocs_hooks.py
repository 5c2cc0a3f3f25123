"""MkDocs hook: the pictures that benchmarks write (benchmarks/*.png) are served beside the pages, so that
benchmarks/RESULTS.md, included whole by docs/results.md, and the guides show them from the one copy."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - MkDocs' config object
    benchmarks = Path(config.config_file_path).parent / "benchmarks"
    for picture in sorted(benchmarks.glob("*.png")):
        files.append(File(picture.name, str(benchmarks), config.site_dir, config.use_directory_urls))
    return files
