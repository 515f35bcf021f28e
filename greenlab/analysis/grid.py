"""The backbone x objective grid: which pre-training objective runs on which backbone config, read from the
objectives' ``needs`` and the capabilities of each backbone as built (greenlab/contracts.py), never written by
hand. ``python -m greenlab.analysis.grid`` prints the table that docs/grid.md holds between its markers (a test
keeps the file true)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from greenlab import contracts
from greenlab.analysis import generated
from greenlab.config import CONFIG_DIR, build

OBJECTIVES = (
    "token_reconstruction",
    "mae",
    "spark",
    "label_supervised",
)  # the objectives that take a backbone
# every backbone config but the ones that are a file's weights (retfound_*) or any timm model by name (timm)
BACKBONES = ("vit_small_reg4_dinov2", "vit_base_reg4_dinov2", "vit_large_reg4_dinov2", "vit_small_patch16",
             "vit_large_patch16_mae", "resnet50", "convnext_tiny", "nn_mobilenet", "vit3d", "resnet3d18",
             "three_plane_resnet3d18")  # fmt: skip
MARKERS = ("<!-- grid:start (python -m greenlab.analysis.grid) -->", "<!-- grid:end -->")


def backbone_capabilities(name: str) -> tuple[set[str], str]:
    """(capabilities, description) of ``backbone/<name>`` with random weights, built on the meta device (no
    memory, no initialisation)."""
    with torch.device("meta"):
        backbone = build(f"backbone/{name}", overrides=["img_size=224"], weights="random")
    return contracts.capabilities(backbone), contracts.describe(backbone)


def markdown() -> str:
    """The capabilities, then the grid: one row per backbone, one column per objective; a refused cell
    names what is missing."""
    needs = {
        o: get_class(OmegaConf.load(CONFIG_DIR / "objective" / f"{o}.yaml")._target_).needs
        for o in OBJECTIVES
    }
    lines = [MARKERS[0], "", "| capability | what it is |", "|---|---|"]
    lines += [f"| {name} | {words} |" for name, words in contracts.CAPABILITIES.items()]
    lines += ["", f"| backbone | is | {' | '.join(OBJECTIVES)} |", "|---|---|" + "---|" * len(OBJECTIVES)]
    for name in BACKBONES:
        offered, description = backbone_capabilities(name)
        cells = []
        for objective in OBJECTIVES:
            missing = contracts.unmet(needs[objective], offered)
            needed = ", ".join(" or ".join(contracts.alternatives(m)) for m in missing)
            cells.append(f"no: needs {needed}" if missing else "runs")
        lines.append(f"| `{name}` | {description.removeprefix('a ')} | {' | '.join(cells)} |")
    return "\n".join([*lines, "", MARKERS[1]])


def generated_part(path: Path) -> str:
    """The text between the markers of ``path``, markers included."""
    return generated.generated_part(path, MARKERS)


if __name__ == "__main__":
    print(markdown())
