import re

import pandas as pd
import pytest
import yaml

from greenlab.labels.__main__ import main as labels_main
from greenlab.labels.evaluate import score
from greenlab.labels.rules import RuleLabeller
from greenlab.labels.vocabulary import load_vocabulary
from tests.conftest import REPO, shared_data

# its module-scoped runs are made once: `make test` (pytest-xdist --dist loadgroup) keeps the file on one worker
pytestmark = pytest.mark.xdist_group("labels")


@pytest.fixture(scope="module")
def chexpert():
    return RuleLabeller(load_vocabulary("chexpert14"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No pleural effusion or pneumothorax.", {"pleural_effusion": 0, "pneumothorax": 0}),
        ("Small right pleural effusion.", {"pleural_effusion": 1}),
        (
            "There is a small right pleural effusion, but no pneumothorax.",
            {"pleural_effusion": 1, "pneumothorax": 0},
        ),
        ("Possible left basilar atelectasis.", {"atelectasis": -1}),
        ("Pneumonia cannot be excluded.", {"pneumonia": -1}),
        ("The previously seen pneumothorax has resolved.", {"pneumothorax": 0}),
        ("Heart size is normal.", {"cardiomegaly": 0}),
        (
            "No pneumothorax. Large pneumothorax on the left on the lateral view.",
            {"pneumothorax": 1},
        ),  # any 1 wins
        ("Lungs are clear.", {"pneumothorax": None, "no_finding": 1}),
        ("Mild cardiomegaly.", {"cardiomegaly": 1, "no_finding": 0}),
        ("Right IJ catheter in place.", {"support_devices": 1, "no_finding": 1}),  # devices are no pathology
    ],
)
def test_rules_negation_uncertainty_and_scope(chexpert, text, expected):
    labels = chexpert(text)
    for name, value in expected.items():
        assert labels[name] == value, (text, name, labels[name])


def test_shipped_vocabularies():
    assert len(load_vocabulary("ctrate18").findings) == 18
    assert len(load_vocabulary("merlin30").findings) == 30
    names = load_vocabulary("chexpert14").names
    assert len(names) == 14 and "no_finding" in names and "pleural_effusion" in names


def test_user_vocabulary_and_its_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(
        yaml.safe_dump(
            {"name": "mine", "findings": [{"name": "hiatal_hernia", "mentions": ["hiatal hernia"]}]}
        )
    )
    assert RuleLabeller(load_vocabulary(str(good)))("Small hiatal hernia.") == {"hiatal_hernia": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"findings": [{"name": "Hiatal Hernia"}]}))
    with pytest.raises(ValueError, match=r"bad\.yaml.*snake_case"):
        load_vocabulary(str(bad))
    with pytest.raises(FileNotFoundError, match="chexpert14"):
        load_vocabulary("no_such_vocabulary")


def test_cli_writes_labels_and_never_overwrites(tmp_path, capsys):
    reports = tmp_path / "reports.csv"
    pd.DataFrame(
        {
            "uid": ["a", "b"],
            "findings": ["Small left pleural effusion.", "No effusion."],
            "impression": ["", "Normal."],
        }
    ).to_csv(reports, index=False)
    out = tmp_path / "labels.csv"
    args = [
        "--input",
        str(reports),
        "--id-column",
        "uid",
        "--text-columns",
        "findings,impression",
        "--findings",
        "chexpert14",
        "--backend",
        "rules",
        "--output",
        str(out),
    ]
    assert labels_main(args) == 0
    table = pd.read_csv(out, dtype={"uid": str})
    assert list(table.columns) == ["uid", *load_vocabulary("chexpert14").names]
    assert table["pleural_effusion"].tolist() == [1, 0] and table["pneumothorax"].isna().all()
    before = out.read_bytes()
    assert labels_main(args) == 2 and "never replaces" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert labels_main([*args[:4], "--text-columns", "report", *args[6:-1], str(tmp_path / "other.csv")]) == 2
    assert re.search(r"reports\.csv.*\['report'\] not found", capsys.readouterr().err)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty file"),
        (b"uid,findings\n", "a header and no reports"),
        ("uid,findings\na,Kleiner Pleuraergu\u00df.\n".encode("latin-1"), "not utf-8 text (invalid"),
    ],
    ids=["zero-byte", "header-only", "latin-1"],
)
def test_cli_bad_reports_files_are_named(tmp_path, capsys, content, fragment):
    reports = tmp_path / "reports.csv"
    reports.write_bytes(content)
    args = ["--input", str(reports), "--id-column", "uid", "--text-columns", "findings", "--findings", "chexpert14",
            "--output", str(tmp_path / "labels.csv")]  # fmt: skip
    assert labels_main(args) == 2
    err = capsys.readouterr().err
    assert str(reports) in err and fragment in err
    if fragment.startswith("not utf-8"):
        assert "--encoding latin-1" in err
        assert labels_main([*args, "--encoding", "latin-1"]) == 0


def test_rules_scope_is_bounded_and_long_reports_are_refused(monkeypatch):
    """Each cue search sees at most SCOPE_CHARS either side of a mention (a report's cost stays linear in its
    length: one 100 KB sentence used to take minutes); a report beyond MAX_REPORT_CHARS is named."""
    from greenlab.labels import rules

    seen = []

    class Recording:
        def __init__(self, pattern):
            self.pattern = pattern

        def search(self, text):
            seen.append(len(text))
            return self.pattern.search(text)

    for name in ("PRE_UNCERTAIN_RE", "POST_UNCERTAIN_RE", "PRE_NEGATION_RE", "POST_NEGATION_RE"):
        monkeypatch.setattr(rules, name, Recording(getattr(rules, name)))
    labeller = RuleLabeller("chexpert14")
    sentence = "there is " + " and ".join(["mild edema near the hilum"] * 4000)  # one 100 KB sentence
    assert labeller(sentence)["edema"] == 1
    assert len(seen) >= 4000 and max(seen) <= rules.SCOPE_CHARS
    assert labeller("no edema, but " + "x " * 500 + "effusion")["edema"] == 0  # scopes still end at clauses
    with pytest.raises(ValueError, match="report r2: 1,000,001 characters"):
        labeller.label_many(["edema", "e" * 1_000_001], ids=["r1", "r2"])


def test_rules_against_manual_codes_on_real_reports():
    path = shared_data("reports", "indiana_reports_dev.csv")
    reports = pd.read_csv(path, dtype=str, keep_default_na=False)
    labeller = RuleLabeller(load_vocabulary("chexpert14"))
    texts = (reports["findings"] + " \n" + reports["impression"]).tolist()
    labels = pd.DataFrame([labeller(t) for t in texts]).astype("Int64")
    labels.insert(0, "uid", reports["uid"])
    mapping = yaml.safe_load(
        (REPO / "experiments" / "report_labels" / "indiana_problems_to_chexpert.yaml").read_text()
    )
    table = score(labels, reports, "uid", "Problems", mapping).set_index("finding")
    assert table["f1"].mean() > 0.78  # measured 0.819
    for finding in ("pleural_effusion", "atelectasis", "lung_opacity", "cardiomegaly"):
        assert table.loc[finding, "f1"] > 0.8, finding
