"""Finding vocabularies: shipped ones by name (``ctrate18``, ``merlin30``, ``greenrfm30``, ``chexpert14``) or a
user YAML.

YAML: ``name``, optional ``derived_no_finding``, and ``findings``: a list of ``{name, mentions, absent}``:
snake_case name, phrases that mention the finding, phrases that state it is absent outright.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SHIPPED = Path(__file__).resolve().parent / "vocabularies"
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Finding:
    name: str
    mentions: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vocabulary:
    name: str
    findings: tuple[Finding, ...]
    derived_no_finding: bool = False
    source: str = field(default="", compare=False)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.findings]


def load_vocabulary(name_or_path: str) -> Vocabulary:
    """A shipped vocabulary by name, or a YAML file; errors name the file and the problem."""
    path = SHIPPED / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
        raise FileNotFoundError(
            f"no vocabulary {name_or_path!r}: not a shipped one ({shipped}) nor a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("findings"), list) or not data["findings"]:
        raise ValueError(f"{path}: needs a non-empty 'findings' list")
    findings = []
    for entry in data["findings"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not name or not SNAKE.match(name):
            raise ValueError(f"{path}: finding {entry!r} needs a snake_case 'name'")
        findings.append(Finding(name, tuple(entry.get("mentions") or ()), tuple(entry.get("absent") or ())))
    names = [f.name for f in findings]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate finding names")
    return Vocabulary(
        data.get("name", path.stem), tuple(findings), bool(data.get("derived_no_finding")), str(path)
    )
