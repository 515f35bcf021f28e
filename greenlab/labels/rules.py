"""Rule-based labelling in the CheXpert-labeller / NegBio family.

Per sentence, each mention of a finding is classified by the words around it, in this order:
1. uncertainty before the mention ("possible", "cannot exclude", "suspicious for", ...) or after it
   ("cannot be excluded", "is suspected", ...)        -> -1
2. negation before it ("no", "without", "negative for", "no evidence of", ...) or after it
   ("is absent", "has resolved", "not seen", ...)      -> 0
3. otherwise                                          -> 1
A scope ends at a clause break (", but", "however", "although", ";"), and at most ``SCOPE_CHARS``
characters from the mention (far beyond any cue; it keeps a report's cost linear in its length). A phrase from the finding's
``absent`` list ("heart size is normal") gives 0. Per report: any 1 -> 1, else any -1 -> -1, else any
0 -> 0, else not mentioned (None). With ``derived_no_finding``: ``no_finding`` = 1 when no other finding
but support devices is 1 or -1, else 0.
"""

from __future__ import annotations

import bisect
import re

from tqdm.auto import tqdm

from greenlab.labels.vocabulary import Vocabulary, load_vocabulary

PRE_UNCERTAIN = [
    r"possible", r"possibly", r"probable", r"probably", r"may (?:represent|be|reflect)", r"might", r"could (?:be|represent)",
    r"cannot (?:be )?(?:excluded?|ruled? out)", r"can ?not (?:be )?(?:excluded?|ruled? out)", r"not (?:be )?excluded",
    r"questionable", r"question of", r"suspicious (?:for|of)", r"suspected", r"suggestive of", r"suggests?",
    r"concerning for", r"worrisome for", r"likely", r"versus", r"vs\.?", r"differential", r"equivocal",
    r"borderline", r"indeterminate", r"consider", r"compatible with", r"consistent with", r"atypical", r"\?",
]  # fmt: skip
POST_UNCERTAIN = [
    r"(?:is|are|cannot be|can not be|not) (?:not )?(?:excluded|ruled out)", r"(?:is|are) (?:possible|suspected|questioned)",
    r"not (?:entirely )?excluded", r"versus", r"vs\.?", r"\?",
]  # fmt: skip
PRE_NEGATION = [
    r"no", r"not", r"without", r"negative for", r"free of", r"absence of", r"absent", r"resolution of",
    r"resolved", r"rather than", r"clear of", r"no (?:new|acute|focal|definite|evidence of|signs? of|findings? of)",
    r"neither", r"nor", r"removal of", r"removed", r"exclude", r"excluded", r"ruled out",
]  # fmt: skip
POST_NEGATION = [
    r"(?:is|are|was|were) (?:not (?:seen|identified|present|visualized|evident)|absent|resolved|removed|gone|negative)",
    r"(?:has|have) (?:resolved|cleared|been removed)", r"not (?:seen|identified|present|appreciated)", r"resolved",
]  # fmt: skip
CLAUSE_BREAK = re.compile(
    r",\s*(?:but|however|although|which|though)\b|\b(?:but|however|although|though|except)\b|;"
)
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
SCOPE_CHARS = 400  # the longest cue scope looked at on either side of a mention
MAX_REPORT_CHARS = 1_000_000  # longer is not a radiology report (a whole file pasted into one cell?)


def _alternation(patterns: list[str]) -> str:
    return "(?:" + "|".join(patterns) + ")"


PRE_UNCERTAIN_RE = re.compile(r"(?:^|\W)" + _alternation(PRE_UNCERTAIN) + r"(?:\W|$)")
POST_UNCERTAIN_RE = re.compile(r"(?:^|\W)" + _alternation(POST_UNCERTAIN) + r"(?:\W|$)")
PRE_NEGATION_RE = re.compile(r"(?:^|\W)" + _alternation(PRE_NEGATION) + r"(?:\W|$)")
POST_NEGATION_RE = re.compile(r"(?:^|\W)" + _alternation(POST_NEGATION) + r"(?:\W|$)")


def _phrase_re(phrases) -> re.Pattern | None:
    if not phrases:
        return None
    ordered = sorted({p.lower() for p in phrases}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in ordered) + r")\b")


class RuleLabeller:
    """``labeller(text) -> {finding: 1 | 0 | -1 | None}`` for one report; ``label_many(texts)`` for many.
    vocabulary: a ``Vocabulary``, or the name / YAML path of one."""

    def __init__(self, vocabulary: Vocabulary | str):
        vocabulary = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
        self.vocabulary = vocabulary
        self.patterns = {f.name: (_phrase_re(f.mentions), _phrase_re(f.absent)) for f in vocabulary.findings}

    def __repr__(self) -> str:
        return f"RuleLabeller({self.vocabulary.name})"

    def label_many(self, texts: list[str], ids: list[str] | None = None) -> list[dict[str, int | None]]:
        ids = ids or [f"row {i + 1}" for i in range(len(texts))]
        for text, name in zip(texts, ids):
            if text and len(text) > MAX_REPORT_CHARS:
                raise ValueError(f"report {name}: {len(text):,} characters, more than {MAX_REPORT_CHARS:,}")
        return [self(text) for text in tqdm(texts, desc="labelling reports", unit="report")]

    def __call__(self, text: str) -> dict[str, int | None]:
        found: dict[str, list[int]] = {name: [] for name in self.patterns}
        for sentence in SENTENCE.split((text or "").lower()):
            breaks = [(m.start(), m.end()) for m in CLAUSE_BREAK.finditer(sentence)]
            for name, (mention, absent) in self.patterns.items():
                if absent is not None and absent.search(sentence):
                    found[name].append(0)
                if mention is None:
                    continue
                for match in mention.finditer(sentence):
                    found[name].append(self.classify(sentence, breaks, match.start(), match.end()))
        labels = {name: aggregate(values) for name, values in found.items()}
        if self.vocabulary.derived_no_finding and "no_finding" in labels:
            others = [v for k, v in labels.items() if k not in ("no_finding", "support_devices")]
            labels["no_finding"] = 0 if any(v in (1, -1) for v in others) else 1
        return labels

    @staticmethod
    def classify(sentence: str, breaks: list[tuple[int, int]], start: int, end: int) -> int:
        """1 / 0 / -1 for the mention at sentence[start:end], looking within its clause (``breaks``: the
        sentence's clause-break spans) and at most ``SCOPE_CHARS`` either side."""
        i = bisect.bisect_right(breaks, (start, start))  # the breaks before the mention are breaks[:i]
        clause_start = max(breaks[i - 1][1] if i and breaks[i - 1][1] <= start else 0, start - SCOPE_CHARS)
        j = bisect.bisect_left(breaks, (end, end))
        clause_end = min(breaks[j][0] if j < len(breaks) else len(sentence), end + SCOPE_CHARS)
        before, after = sentence[clause_start:start], sentence[end:clause_end]
        if PRE_UNCERTAIN_RE.search(before) or POST_UNCERTAIN_RE.search(after):
            return -1
        if PRE_NEGATION_RE.search(before) or POST_NEGATION_RE.search(after):
            return 0
        return 1


def aggregate(values: list[int]) -> int | None:
    """Per report: any present -> 1, else any uncertain -> -1, else any absent -> 0, else None."""
    if 1 in values:
        return 1
    if -1 in values:
        return -1
    if 0 in values:
        return 0
    return None
