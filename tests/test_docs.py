"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a missing page or a docstring
mkdocstrings cannot read fails), every page the nav lists exists, the results.json reference of docs/outputs.md is
the results model's, the README stays short, and each tutorial under docs/tutorials/ runs at tiny size."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import yaml

from greenlab.analysis import docs_outputs
from tests.conftest import REPO

TUTORIALS = sorted(p.stem for p in (REPO / "docs" / "tutorials").glob("*.py"))


def nav_pages(nav) -> list[str]:
    """Every page path the mkdocs.yml nav lists."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return [p for item in nav for p in nav_pages(item)]


def test_every_page_in_the_nav_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    missing = [p for p in pages if not ((REPO / "docs" / p).is_file() or (REPO / p).is_file())]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"
    assert {f"tutorials/{name}.md" for name in TUTORIALS} <= set(pages), "every tutorial script has its page"


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs is not installed (the [docs] extra, installed by `make install`)")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    site = tmp_path / "site"
    for page in ("index.html", "methods/retfound_green/index.html", "outputs/index.html",
                 "api/objectives/index.html", "experiments/efficiency/index.html"):  # fmt: skip
        assert (site / page).is_file(), page
    assert (site / "experiments" / "efficiency" / "auroc_vs_energy.png").is_file(), (
        "the measured plots are on the site"
    )
    assert "TokenReconstruction" in (site / "api" / "objectives" / "index.html").read_text()


def test_the_results_json_reference_is_the_results_model():
    assert (
        docs_outputs.generated.generated_part(docs_outputs.PAGE, docs_outputs.MARKERS)
        == docs_outputs.markdown()
    ), "docs/outputs.md is out of date: run `python -m greenlab.analysis.docs_outputs --write`"


def test_the_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size < 10_000, f"README.md is {size} bytes: move reference content into docs/"


@pytest.mark.slow
@pytest.mark.parametrize("name", TUTORIALS)
def test_the_tutorial_runs_at_tiny_size(name, tmp_path):
    """Each tutorial as a reader runs it (its own process, from another folder), at tiny size."""
    env = {**os.environ, "GREENLAB_TUTORIAL_TINY": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "tutorials" / f"{name}.py"), "--out", str(tmp_path / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, (
        f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    assert "read next" in proc.stdout or "backbone:" in proc.stdout or "comparison.md" in proc.stdout
    print(f"{name}: {time.monotonic() - start:.1f} s")
