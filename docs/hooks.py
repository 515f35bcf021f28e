"""MkDocs hook (mkdocs.yml ``hooks:``): the studies under experiments/ (each README, its tables and plots) and
benchmarks/README.md become pages of the site, read in place (nothing is copied into docs/), and a docs page's
GitHub-style link to them (``../experiments/grid/README.md`` from docs/grid.md) is pointed at those pages,
so the same Markdown works on GitHub and on the site, and `mkdocs build --strict` checks every such link."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

SOURCES = ("experiments/*/*.md", "experiments/*/*.png", "experiments/*/*.csv", "benchmarks/README.md")
OUTSIDE = ("experiments", "benchmarks")


def _repo(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    repo = _repo(config)
    for pattern in SOURCES:
        for path in sorted(repo.glob(pattern)):
            uri = path.relative_to(repo).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File(uri, str(repo), config.site_dir, config.use_directory_urls))
    return files


def on_page_markdown(markdown, page, config, files):
    """``](../<depth+1>experiments/...)`` in a docs page -> ``](../<depth>experiments/...)``."""
    if page.file.src_uri.startswith(OUTSIDE):
        return markdown
    depth = page.file.src_uri.count("/")
    pattern = re.compile(r"\]\(" + re.escape("../" * (depth + 1)) + r"(" + "|".join(OUTSIDE) + r")/")
    return pattern.sub(lambda m: "](" + "../" * depth + m.group(1) + "/", markdown)
