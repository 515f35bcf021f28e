"""Generated parts of the docs: the text between two marker lines of a page, written by a generator
(``python -m greenlab.analysis.grid``, ``python -m greenlab.analysis.docs_outputs``) and kept true by a test
that compares the committed page with a fresh generation."""

from __future__ import annotations

from pathlib import Path


def generated_part(path: Path, markers: tuple[str, str]) -> str:
    """The text between ``markers`` in ``path``, markers included; a ValueError names a missing marker."""
    text = Path(path).read_text()
    for marker in markers:
        if marker not in text:
            raise ValueError(f"{path}: marker {marker!r} not found")
    start, end = text.index(markers[0]), text.index(markers[1]) + len(markers[1])
    return text[start:end]


def write_generated_part(path: Path, markers: tuple[str, str], generated: str) -> bool:
    """Replace the text between ``markers`` in ``path`` (markers included) by ``generated``, which starts and
    ends with them; True when the file changed."""
    if not (generated.startswith(markers[0]) and generated.endswith(markers[1])):
        raise ValueError("the generated text must start and end with its markers")
    text = Path(path).read_text()
    updated = text.replace(generated_part(path, markers), generated)
    if updated != text:
        Path(path).write_text(updated)
    return updated != text
