"""results.json's recipe: the deviations of a run from its experiment at scale=paper (greenlab/results/recipe.py)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from greenlab.config import CONFIG_DIR
from greenlab.results import recipe
from greenlab.results.model import Recipe

LOADED = {"requested": "/w/dinov2.pth", "used": "file", "source": "/w/dinov2.pth", "note": None}
RANDOM = {"requested": "cached", "used": "random", "source": None, "note": "not in the local cache"}


def composed(experiment: str, *overrides: str) -> dict:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[f"+experiment={experiment}", *overrides]))


def check(
    experiment: str, overrides: list[str], init: dict, scale: str = "paper", world_size: int = 1
) -> dict:
    used = composed(experiment, f"scale={scale}", *overrides)
    return recipe.deviations(
        used, composed(experiment, "scale=paper"), composed(experiment, f"scale={scale}"), init, world_size
    )


def test_paper_scale_with_the_official_weights_is_faithful():
    result = check("retfound_green", ["backbone.weights=/w/dinov2.pth"], LOADED)
    assert result == {"faithful": True, "deviations": []}
    # the data source is the user's (a folder of photographs), not a deviation; hardware neither
    assert check("retfound_green", ["data=fundus_folder", "data.root=/photos", "trainer=gpu"], LOADED)[
        "faithful"
    ]
    # nor the speed options (same maths) or how a run resumes
    speed = ["compile=true", "channels_last=true", "resume.allow_config_change=true", "resume.from=epoch-3"]
    assert check("sparse_cnn_mae", speed, {"requested": "random", "used": "random"})["faithful"]


def test_the_demo_lists_its_budget_and_initialisation():
    found = {d["key"]: d for d in check("retfound_green", [], RANDOM, scale="demo")["deviations"]}
    assert found["img_size"] == {"key": "img_size", "paper": 392, "used": 112, "why": "scale=demo"}
    assert found["trainer.max_epochs"]["paper"] == 120 and found["trainer.max_epochs"]["why"] == "scale=demo"
    assert found["init.used"] == {
        "key": "init.used",
        "paper": "cached",
        "used": "random",
        "why": "not in the local cache",
    }


def test_an_override_is_named_with_both_values():
    result = check(
        "sparse_cnn_mae", ["objective.mask_ratio=0.75"], {"requested": "random", "used": "random"}
    )  # SparK: from scratch
    assert result["deviations"] == [
        {"key": "objective.mask_ratio", "paper": 0.6, "used": 0.75, "why": "override"}
    ]


def test_random_weights_asked_for_are_a_deviation_too():
    asked = {"requested": "random", "used": "random", "note": None}
    assert check("retfound_green", ["backbone.weights=random"], asked)["deviations"] == [
        {"key": "init.used", "paper": "cached", "used": "random", "why": "weights=random"}
    ]


def test_each_encoder_that_started_random_is_a_deviation():
    init = {
        "image": RANDOM,
        "text": {"requested": "microsoft/BiomedVLP-CXR-BERT-specialized", "used": "random"},
    }
    keys = [d["key"] for d in check("greenrfm", [], init)["deviations"]]
    assert keys == ["init.image.used", "init.text.used"]
    lines = recipe.markdown(Recipe.from_json({"experiment": "greenrfm", **check("greenrfm", [], init)}))
    assert "| `init.text.used` | microsoft/BiomedVLP-CXR-BERT-specialized | random |" in "\n".join(lines)
