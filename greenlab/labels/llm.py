"""LLM labelling through any OpenAI-compatible ``/chat/completions`` endpoint.

- The key comes from an environment variable (default ``OPENAI_API_KEY``) and is sent only in the
  Authorization header: never logged, never in an error message or repr.
- Bounded concurrency (a thread pool), up to ``retries`` retries with exponential backoff on HTTP 429,
  5xx, timeouts, connection errors and answers that fail validation; a server's ``Retry-After`` (seconds
  or an HTTP date, capped at ``MAX_RETRY_AFTER_S``) is waited instead when it asks for longer.
- ``max_connection_failures`` connection failures in a row (whatever the report) stop the whole run with
  a clear error: an unreachable endpoint costs seconds, not an hour of retries over every report.
- A redirect to another host is refused (the Authorization header never leaves the configured host).
- Two prompts (``prompt``). ``official``: SadVoxel/GreenRFM llm_pipeline/extraction.py's system prompt
  (SYSTEM_PROMPT_18 / SYSTEM_PROMPT_30 verbatim for their finding lists, the same text over any other
  vocabulary), the user message ``f"\n\n{report}"``, and its answer: one line of N comma-separated values
  1 / 0 / -1 (-1: "ambiguous, uncertain, or lacks information", so an unmentioned finding comes back -1,
  uncertain), parsed as extraction.py does (tokens stripped, more than N cut to N, fewer refused, only
  0 / 1 / -1); reports under 5 characters are not sent (extraction.py skips them: no labels). ``json``
  (greenlab): a JSON object ``{"labels": {finding: value}}`` with exactly the vocabulary's findings and values
  ``present`` / ``absent`` / ``uncertain`` / ``not_mentioned``, validated strictly.
- A report still unlabelled after the retries (``on_failure``): ``blank``, as extraction.py (its row keeps
  ``pd.NA``: no labels, read as unmentioned), with a loud warning and the reports and errors listed in
  ``<cache>.failed.csv``, not cached (a re-run asks again), unless every report asked failed (then it stops:
  no labels at all is no run); ``error`` (greenlab) stops the run naming them.
- A persistent cache (JSON lines, appended and flushed per report) keyed by sha256(model, prompt, report
  text, temperature unless 0): a re-run makes no repeat call, and an interrupted run loses nothing already
  extracted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path

from tqdm.auto import tqdm

from greenlab.labels.vocabulary import Vocabulary, load_vocabulary
from greenlab.warnings_banner import loud_warning

log = logging.getLogger(__name__)

VALUES = {"present": 1, "absent": 0, "uncertain": -1, "not_mentioned": None}
PROMPTS = ("official", "json")
ON_FAILURE = ("blank", "error")
# SadVoxel/GreenRFM llm_pipeline/extraction.py SYSTEM_PROMPT_18 and SYSTEM_PROMPT_30 (two trailing spaces after
# "imaging." and "Example:" as there), their finding list and example line as fields
OFFICIAL_PROMPT = (
    "You are a board-certified radiologist specializing in thoracic imaging.  \n"
    "\n"
    "Task\n"
    "Classify the chest/abdomen CT report for the following {n} findings, in the exact order listed:\n"
    "{findings}\n"
    "\n"
    "Labeling rules\n"
    "- Output a single line of {n} comma-separated values.\n"
    "- Use 1 if the finding is explicitly present.\n"
    "- Use 0 if the finding is explicitly ruled out or absent.\n"
    "- Use -1 if the report is ambiguous, uncertain, or lacks information.\n"
    "\n"
    "Only return the comma-separated numbers.\n"
    "Example:  \n"
    "{example}\n"
)
# SYSTEM_PROMPT_30's example line; SYSTEM_PROMPT_18's is its first 18 values (more findings: 0 after these)
OFFICIAL_EXAMPLE = "0,1,-1,-1,1,-1,-1,-1,-1,-1,0,0,0,0,1,0,0,0,-1,0,0,1,0,0,0,0,0,0,0,0".split(",")
# SYSTEM_PROMPT_30 lists extraction.py's LABEL_COLUMNS_30 as they are (snake_case); SYSTEM_PROMPT_18 (and any
# other vocabulary here) the finding names in words
OFFICIAL_SNAKE_CASE = (
    "submucosal_edema", "renal_hypodensities", "aortic_valve_calcification", "coronary_calcification",
    "thrombosis", "metastatic_disease", "pancreatic_atrophy", "renal_cyst", "osteopenia",
    "surgically_absent_gallbladder", "atelectasis", "abdominal_aortic_aneurysm", "anasarca", "hiatal_hernia",
    "lymphadenopathy", "prostatomegaly", "biliary_ductal_dilation", "cardiomegaly", "splenomegaly",
    "hepatomegaly", "atherosclerosis", "ascites", "pleural_effusion", "hepatic_steatosis", "appendicitis",
    "gallstones", "hydronephrosis", "bowel_obstruction", "free_air", "fracture",
)  # fmt: skip
OFFICIAL_TOKENS = {"1": 1, "0": 0, "-1": -1}
OFFICIAL_SHORTEST_REPORT = 5  # extraction.py: `if len(report.strip()) < 5: # Skip empty or too short`
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 300.0


class LLMError(RuntimeError):
    """A report could not be labelled; the message never contains the API key."""


class EndpointUnreachable(LLMError):
    """Too many connection failures in a row: the run stops instead of trying every report."""


class SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the configured host; another host is refused before any request."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise LLMError(
                f"{req.full_url} redirected (HTTP {code}) to another host, {new.scheme}://{new.netloc}: refused "
                "(the API key is only ever sent to the configured host); set base_url to the endpoint itself"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (delta seconds or an HTTP date) in seconds, capped; None when absent/invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def official_prompt(vocabulary: Vocabulary) -> str:
    """extraction.py's system prompt over ``vocabulary``'s findings, in its order: SYSTEM_PROMPT_18 for ctrate18,
    SYSTEM_PROMPT_30 for its LABEL_COLUMNS_30 (vocabulary greenrfm30), verbatim."""
    names = vocabulary.names
    listed = names if tuple(names) == OFFICIAL_SNAKE_CASE else [name.replace("_", " ") for name in names]
    example = (OFFICIAL_EXAMPLE + ["0"] * len(names))[: len(names)]
    return OFFICIAL_PROMPT.format(
        n=len(names),
        findings="\n".join(f"{i}. {name}" for i, name in enumerate(listed, 1)),
        example=",".join(example),
    )


def parse_csv_line(content: str, vocabulary: Vocabulary) -> dict[str, int]:
    """The official answer, parsed as extraction.py's ``classify_one``: ``content.strip().split(",")``, each token
    stripped; more than N tokens cut to the first N, fewer refused; every token 0, 1 or -1 (ValueError else)."""
    n = len(vocabulary.names)
    tokens = [token.strip() for token in str(content).strip().split(",")]
    if len(tokens) < n:
        raise ValueError(f"expected {n} comma-separated values, got {len(tokens)}: {str(content)[:80]!r}")
    tokens = tokens[:n]
    if any(token not in OFFICIAL_TOKENS for token in tokens):
        raise ValueError(f"values other than 0, 1, -1: {str(content)[:80]!r}")
    return {name: OFFICIAL_TOKENS[token] for name, token in zip(vocabulary.names, tokens)}


def build_prompt(vocabulary: Vocabulary) -> str:
    """greenlab's JSON prompt (``prompt=json``)."""
    findings = "\n".join(f"- {f.name}" for f in vocabulary.findings)
    return (
        "You label radiology reports. For each finding below, say whether the report states it is present, "
        "absent (explicitly negated or ruled out), uncertain (hedged: possible, cannot exclude, ...), or "
        "not_mentioned.\nFindings:\n"
        f"{findings}\n"
        'Answer with one JSON object only: {"labels": {"<finding>": "present" | "absent" | "uncertain" | '
        '"not_mentioned", ...}} with every finding listed above and no other key.'
    )


def parse_answer(content: str, vocabulary: Vocabulary) -> dict[str, int | None]:
    """Validated labels from the model's answer text; ValueError when it is not exactly as asked."""
    try:
        answer = json.loads(content)
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"answer is not JSON: {str(content)[:80]!r}") from err
    labels = answer.get("labels") if isinstance(answer, dict) else None
    if not isinstance(labels, dict):
        raise ValueError("answer has no 'labels' object")
    if set(labels) != set(vocabulary.names):
        missing, extra = set(vocabulary.names) - set(labels), set(labels) - set(vocabulary.names)
        raise ValueError(
            f"answer findings differ: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    bad = {k: v for k, v in labels.items() if v not in VALUES}
    if bad:
        raise ValueError(f"answer has values outside {sorted(VALUES)}: {dict(list(bad.items())[:3])}")
    return {name: VALUES[labels[name]] for name in vocabulary.names}


class LabelCache:
    """JSON-lines cache ``{"key": ..., "labels": {...}}``, appended and flushed one report at a time."""

    def __init__(self, path: Path):
        self.path, self._lock, self.entries = Path(path), threading.Lock(), {}
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["labels"]
                except (json.JSONDecodeError, KeyError):
                    log.warning(
                        "%s line %d is damaged (an interrupted write?); that report will be asked again",
                        self.path,
                        number,
                    )

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, labels: dict) -> None:
        with self._lock:
            self.entries[key] = labels
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps({"key": key, "labels": labels}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())


class LLMLabeller:
    """``labeller.label_many(texts) -> [{finding: 1 | 0 | -1 | None}]``, cached, concurrent, retried; ``prompt``
    official | json, ``temperature`` None (not sent: the server's default, as extraction.py) or a number."""

    def __init__(self, vocabulary: Vocabulary | str, base_url: str, model: str, prompt: str,
                 temperature: float | None, cache_path: str | Path, api_key_env: str, concurrency: int,
                 retries: int, timeout_s: float, backoff_s: float, max_connection_failures: int,
                 on_failure: str):  # fmt: skip
        if prompt not in PROMPTS:
            raise ValueError(f"data.labeller.prompt must be one of {PROMPTS}, not {prompt!r}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"data.labeller.on_failure must be one of {ON_FAILURE}, not {on_failure!r}")
        self.on_failure = on_failure
        vocabulary = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
        if not base_url or not model:
            raise ValueError(
                "the llm labeller needs base_url and model (data.labeller.base_url / data.labeller.model, or "
                "GREENLAB_LLM_BASE_URL / GREENLAB_LLM_MODEL)"
            )
        self.vocabulary, self.model = vocabulary, model
        self.prompt_style, self.temperature = prompt, temperature
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env, self._api_key = api_key_env, os.environ.get(api_key_env)
        self.concurrency, self.retries, self.timeout_s, self.backoff_s = (
            concurrency,
            retries,
            timeout_s,
            backoff_s,
        )
        self.prompt = official_prompt(vocabulary) if prompt == "official" else build_prompt(vocabulary)
        self.cache = LabelCache(Path(cache_path))
        self.calls = 0
        self._calls_lock = threading.Lock()
        self.max_connection_failures, self._failures_in_a_row = max_connection_failures, 0
        self._unreachable: str | None = None
        self._opener = urllib.request.build_opener(SameHostRedirects)

    def __repr__(self) -> str:
        return (f"LLMLabeller(model={self.model!r}, prompt={self.prompt_style!r}, url={self.url!r}, "
                f"key from ${self.api_key_env})")  # fmt: skip

    def cache_key(self, text: str) -> str:
        sampling = [] if self.temperature == 0 else [self.temperature]  # 0: the keys of caches made before
        return hashlib.sha256(json.dumps([self.model, self.prompt, text, *sampling]).encode()).hexdigest()

    def skipped(self, text: str) -> bool:
        """A report the official pipeline does not send (under 5 characters): no labels, no call."""
        return self.prompt_style == "official" and len(text.strip()) < OFFICIAL_SHORTEST_REPORT

    def label_many(self, texts: list[str], ids: list[str] | None = None) -> list[dict]:
        ids = ids or [str(i) for i in range(len(texts))]
        unlabelled = dict.fromkeys(self.vocabulary.names)
        results: list[dict | None] = [
            dict(unlabelled) if self.skipped(t) else self.cache.get(self.cache_key(t)) for t in texts
        ]
        todo = [i for i, r in enumerate(results) if r is None]
        log.info(
            "%d of %d reports already in %s; asking %s for %d",
            len(texts) - len(todo),
            len(texts),
            self.cache.path,
            self.model,
            len(todo),
        )
        failures = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.label_one, texts[i]): i for i in todo}
            for future in tqdm(futures, desc=f"labelling with {self.model}", unit="report"):
                i = futures[future]
                try:
                    results[i] = future.result()
                except EndpointUnreachable as err:
                    pool.shutdown(wait=True, cancel_futures=True)
                    done = sum(r is not None for r in results)
                    raise EndpointUnreachable(f"{err}; {done} of {len(texts)} reports labelled, kept in "
                                              f"{self.cache.path}") from None  # fmt: skip
                except LLMError as err:
                    failures.append((i, str(err)))
        if failures and (self.on_failure == "error" or len(failures) == len(todo)):  # blank: not all of them
            raise LLMError(
                f"{len(failures)} report(s) could not be labelled (the others are saved in {self.cache.path}): "
                + "; ".join(f"report {ids[i]}: {why}" for i, why in failures[:5])
            )
        if failures:
            self.write_failures(failures, texts, ids, unlabelled, results)
        return results

    def write_failures(self, failures, texts, ids, unlabelled: dict, results: list) -> None:
        """on_failure=blank: the failed reports get no labels (as extraction.py's ``pd.NA`` rows), listed in
        ``<cache>.failed.csv`` (id, error, report), with a loud warning."""
        path = self.cache.path.with_name(self.cache.path.stem + ".failed.csv")
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "error", "report"])
            for i, why in failures:
                results[i] = dict(unlabelled)
                writer.writerow([ids[i], why, texts[i]])
        loud_warning(
            f"{len(failures)} of {len(texts)} report(s) could not be labelled by {self.model} and are left "
            f"blank (no labels: unmentioned), as the official extraction.py (data.labeller.on_failure=blank); "
            f"listed in {path}; on_failure=error stops instead. First: report {ids[failures[0][0]]}: "
            f"{failures[0][1]}"
        )

    def label_one(self, text: str) -> dict:
        key = self.cache_key(text)
        last, wait = "no attempt", None
        for attempt in range(self.retries + 1):
            if attempt:
                backoff = self.backoff_s * 2 ** (attempt - 1) * (1 + random.random() / 4)
                time.sleep(max(backoff, wait or 0.0))
            try:
                parse = parse_csv_line if self.prompt_style == "official" else parse_answer
                labels = parse(self._request(text), self.vocabulary)
            except _Retryable as err:
                last, wait = str(err), err.retry_after
                continue
            except ValueError as err:  # malformed answer: ask again
                last = f"invalid answer: {err}"
                continue
            self.cache.put(key, labels)
            return labels
        raise LLMError(f"gave up after {self.retries + 1} attempts: {last}")

    def _request(self, text: str) -> str:
        official = self.prompt_style == "official"
        # extraction.py: {"role": "user", "content": f"\n\n{report}"}
        user = f"\n\n{text}" if official else text
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": self.prompt}, {"role": "user", "content": user}],
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if not official:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with self._calls_lock:
            if self._unreachable:  # another report's request found the endpoint gone: send nothing more
                raise EndpointUnreachable(self._unreachable)
            self.calls += 1
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            self._connected()
            if err.code in RETRY_STATUS:
                raise _Retryable(
                    f"HTTP {err.code}", retry_after_seconds(err.headers.get("Retry-After"))
                ) from None
            raise LLMError(f"HTTP {err.code} from {self.url}: {err.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            with self._calls_lock:
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= self.max_connection_failures and not self._unreachable:
                    self._unreachable = (
                        f"{self.url}: {self._failures_in_a_row} connection failures in a row (last: {reason}); "
                        "stopped: is the server running and base_url right?"
                    )
            if self._unreachable:
                raise EndpointUnreachable(self._unreachable) from None
            raise _Retryable(reason) from None
        except json.JSONDecodeError:
            self._connected()
            raise _Retryable("response body is not JSON") from None
        self._connected()
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("response has no choices[0].message.content") from None

    def _connected(self) -> None:
        with self._calls_lock:
            self._failures_in_a_row = 0


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after
