"""The LLM backend against a fake OpenAI-compatible server on loopback that also errs and talks nonsense: greenlab's
JSON prompt and the official GreenRFM prompt (llm_pipeline/extraction.py: one line of comma-separated 1 / 0 / -1)."""

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from greenlab.config import build
from greenlab.labels.llm import (
    EndpointUnreachable,
    LLMError,
    LLMLabeller,
    official_prompt,
    parse_answer,
    parse_csv_line,
)
from greenlab.labels.vocabulary import load_vocabulary

VOCAB = load_vocabulary("chexpert14")
SECRET = "sk-test-do-not-log-0123456789"


def csv_answer(system: str, report: str, action: str) -> str:
    """The official answer: one value per finding the system prompt lists ("1. medical material"), in its
    order: 1 / 0 for an effusion stated / negated, -1 for everything else ("lacks information"); the
    'csv_*' actions answer too few values, a word among them, or an explanation after them."""
    listed = re.findall(r"^\d+\. (.+)$", system, flags=re.MULTILINE)
    values = ["-1"] * len(listed)
    for i, name in enumerate(listed):
        if "effusion" in name and "effusion" in report:
            values[i] = "0" if "no effusion" in report else "1"
    line = {"ok": ", ".join(values), "csv_short": ",".join(values[:-1]), "csv_bad": ",".join(["yes", *values[1:]]),
            "csv_long": ",".join(values) + ", (the report mentions an effusion)"}  # fmt: skip
    return line.get(action, "Sure! Here are the labels")


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers by keyword; ``script`` lists what to do for the next requests: 429, 500, 'garbage',
    'wrong_keys', 'hang', 'csv_short', 'csv_bad', 'csv_long'; then (or when empty) a valid answer: a JSON
    object, or for the official prompt one CSV line. Reports containing 'poison' always fail."""

    script: list = []
    seen: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        report, system = body["messages"][-1]["content"], body["messages"][0]["content"]
        with self.lock:
            FakeOpenAI.seen.append(
                {"auth": self.headers.get("Authorization"), "report": report, "body": body}
            )
            action = FakeOpenAI.script.pop(0) if FakeOpenAI.script else "ok"
        if "poison" in report:
            action = 500
        if isinstance(action, tuple):  # ("redirect", url) or ("retry_after", header value)
            kind, value = action
            self.send_response(307 if kind == "redirect" else 429)
            self.send_header("Location" if kind == "redirect" else "Retry-After", value)
            self.end_headers()
            return
        if isinstance(action, int):
            self.send_response(action)
            self.end_headers()
            return
        names = re.findall(r"^- ([a-z0-9_]+)$", system, flags=re.MULTILINE)  # the JSON prompt's findings
        labels = {name: "not_mentioned" for name in names}
        if "effusion" in report:
            labels["pleural_effusion"] = "absent" if "no effusion" in report else "present"
        if "possible pneumonia" in report and "pneumonia" in labels:
            labels["pneumonia"] = "uncertain"
        if system.startswith("You are a board-certified radiologist"):  # the official prompt
            content = csv_answer(system, report, action)
        else:
            content = {"ok": json.dumps({"labels": labels}), "garbage": "Sure! Here are the labels: effusion yes",
                       "wrong_keys": json.dumps({"labels": {"effusion": "present"}})}[action]  # fmt: skip
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FAKE_LLM_KEY", SECRET)
    FakeOpenAI.script, FakeOpenAI.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def labeller(url, tmp_path, **kwargs) -> LLMLabeller:
    """greenlab's JSON prompt at temperature 0 unless ``prompt`` / ``temperature`` say otherwise."""
    return build(
        "data/labeller/llm",
        base_url=url,
        model="fake-model",
        cache_path=tmp_path / "cache.jsonl",
        api_key_env="FAKE_LLM_KEY",
        backoff_s=0.01,
        **{"vocabulary": VOCAB, "prompt": "json", "temperature": 0, **kwargs},
    )


REPORTS = [
    "Small left effusion.",
    "no effusion seen.",
    "possible pneumonia in the right base.",
    "Lungs are clear.",
]


def test_retries_errors_and_malformed_answers_then_validates(server, tmp_path, caplog):
    FakeOpenAI.script = [429, 500, "garbage", "wrong_keys"]  # the first report needs 5 attempts
    with caplog.at_level(logging.DEBUG):
        model = labeller(server, tmp_path, concurrency=1, retries=4)
        rows = model.label_many(REPORTS)
    assert [r["pleural_effusion"] for r in rows] == [1, 0, None, None]
    assert rows[2]["pneumonia"] == -1
    assert model.calls == len(REPORTS) + 4
    assert all(s["auth"] == f"Bearer {SECRET}" for s in FakeOpenAI.seen)
    assert SECRET not in caplog.text and SECRET not in repr(model)


def test_cache_means_no_repeat_calls(server, tmp_path):
    labeller(server, tmp_path).label_many(REPORTS)
    again = labeller(server, tmp_path)
    assert again.label_many(REPORTS)[0]["pleural_effusion"] == 1
    assert again.calls == 0
    changed = labeller(server, tmp_path)
    changed.label_many(REPORTS + ["A new report with effusion."])
    assert changed.calls == 1


def test_interrupted_run_keeps_what_was_extracted(server, tmp_path):
    reports = REPORTS + ["poison report"]
    with pytest.raises(LLMError, match=r"1 report\(s\) could not be labelled") as error:
        labeller(server, tmp_path, retries=2, on_failure="error").label_many(
            reports, ids=["a", "b", "c", "d", "e"]
        )
    assert "report e" in str(error.value) and SECRET not in str(error.value)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4, "the four good answers are saved"
    resumed = labeller(server, tmp_path)
    assert resumed.label_many(REPORTS) and resumed.calls == 0


def test_a_failed_report_is_left_blank_as_the_official_pipeline(server, tmp_path, capsys):
    """extraction.py: after max_retry=3 attempts the row keeps pd.NA (no labels); greenlab lists it."""
    model = labeller(server, tmp_path)
    assert (model.retries, model.backoff_s, model.on_failure) == (2, 0.01, "blank")  # 3 attempts in all
    rows = model.label_many(REPORTS + ["poison report"], ids=["a", "b", "c", "d", "e"])
    assert rows[-1] == dict.fromkeys(VOCAB.names) and rows[0]["pleural_effusion"] == 1
    assert model.calls == len(REPORTS) + 3, "the poison report: three attempts"
    failed = (tmp_path / "cache.failed.csv").read_text().splitlines()
    assert failed[0] == "id,error,report" and failed[1].startswith("e,gave up after 3 attempts")
    assert "1 of 5 report(s) could not be labelled" in capsys.readouterr().err
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4, "the failure is not cached"


def test_validation_is_strict():
    good = {"labels": {name: "absent" for name in VOCAB.names}}
    assert set(parse_answer(json.dumps(good), VOCAB).values()) == {0}
    for bad in ("not json", json.dumps({"labels": {**good["labels"], "pleural_effusion": "yes"}}),
                json.dumps({"labels": {**good["labels"], "extra_finding": "absent"}}), json.dumps([1, 0])):  # fmt: skip
        with pytest.raises(ValueError):
            parse_answer(bad, VOCAB)


def test_unreachable_endpoint_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLM_KEY", SECRET)
    model = labeller("http://127.0.0.1:9/v1", tmp_path, retries=1, timeout_s=2)
    with pytest.raises(LLMError, match="gave up after 2 attempts") as error:
        model.label_many(["Small effusion."])
    assert SECRET not in str(error.value)


def test_unreachable_endpoint_stops_after_consecutive_connection_failures(tmp_path, monkeypatch):
    """Not an attempt per report: 5 failures in a row (any reports) end the run, naming the URL."""
    monkeypatch.setenv("FAKE_LLM_KEY", SECRET)
    model = labeller("http://127.0.0.1:9/v1", tmp_path, retries=3, timeout_s=2, concurrency=2)
    with pytest.raises(
        EndpointUnreachable, match=r"127.0.0.1:9/v1/chat/completions: 5 connection failures in a row"
    ):
        model.label_many([f"Report {i} with effusion." for i in range(200)])
    assert model.calls <= 5 + 2


def test_retry_after_is_honoured(server, tmp_path, monkeypatch):
    import greenlab.labels.llm as llm

    waits = []
    monkeypatch.setattr(llm.time, "sleep", waits.append)
    FakeOpenAI.script = [("retry_after", "7")]
    assert labeller(server, tmp_path, concurrency=1).label_many(REPORTS[:1])[0]["pleural_effusion"] == 1
    assert waits == [7.0]
    assert llm.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert (
        llm.retry_after_seconds("99999") == llm.MAX_RETRY_AFTER_S and llm.retry_after_seconds("soon") is None
    )


def test_a_redirect_to_another_host_is_refused_and_the_key_never_sent_there(server, tmp_path):
    other = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    elsewhere = f"http://localhost:{other.server_address[1]}/steal"  # another host name: another origin
    FakeOpenAI.script = [("redirect", elsewhere)]
    try:
        with pytest.raises(LLMError, match="redirected .* to another host, http://localhost:") as error:
            labeller(server, tmp_path, concurrency=1, retries=0).label_many(REPORTS[:1])
    finally:
        other.shutdown()
    assert len(FakeOpenAI.seen) == 1, "nothing reached the other host"
    assert SECRET not in str(error.value)


def test_cli_llm_backend(server, tmp_path):
    import pandas as pd

    from greenlab.labels.__main__ import main

    reports = tmp_path / "reports.csv"
    pd.DataFrame({"uid": ["1", "2"], "findings": REPORTS[:2], "impression": ["", ""]}).to_csv(
        reports, index=False
    )
    out = tmp_path / "labels.csv"
    args = ["--input", str(reports), "--id-column", "uid", "--text-columns", "findings,impression", "--findings",
            "chexpert14", "--backend", "llm", "--llm-base-url", server, "--llm-model", "fake", "--llm-api-key-env",
            "FAKE_LLM_KEY", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert pd.read_csv(out)["pleural_effusion"].tolist() == [1, 0]
    assert len((tmp_path / "labels.csv.llm_cache.jsonl").read_text().splitlines()) == 2


# SadVoxel/GreenRFM llm_pipeline/extraction.py (HEAD 33c3d08), verbatim: SYSTEM_PROMPT_18, SYSTEM_PROMPT_30
SYSTEM_PROMPT_18 = """You are a board-certified radiologist specializing in thoracic imaging.  

Task
Classify the chest/abdomen CT report for the following 18 findings, in the exact order listed:
1. medical material
2. arterial wall calcification
3. cardiomegaly
4. pericardial effusion
5. coronary artery wall calcification
6. hiatal hernia
7. lymphadenopathy
8. emphysema
9. atelectasis
10. lung nodule
11. lung opacity
12. pulmonary fibrotic sequela
13. pleural effusion
14. mosaic attenuation pattern
15. peribronchial thickening
16. consolidation
17. bronchiectasis
18. interlobular septal thickening

Labeling rules
- Output a single line of 18 comma-separated values.
- Use 1 if the finding is explicitly present.
- Use 0 if the finding is explicitly ruled out or absent.
- Use -1 if the report is ambiguous, uncertain, or lacks information.

Only return the comma-separated numbers.
Example:  
0,1,-1,-1,1,-1,-1,-1,-1,-1,0,0,0,0,1,0,0,0
"""  # noqa: W291 (the official text's trailing spaces)

SYSTEM_PROMPT_30 = """You are a board-certified radiologist specializing in thoracic imaging.  

Task
Classify the chest/abdomen CT report for the following 30 findings, in the exact order listed:
1. submucosal_edema
2. renal_hypodensities
3. aortic_valve_calcification
4. coronary_calcification
5. thrombosis
6. metastatic_disease
7. pancreatic_atrophy
8. renal_cyst
9. osteopenia
10. surgically_absent_gallbladder
11. atelectasis
12. abdominal_aortic_aneurysm
13. anasarca
14. hiatal_hernia
15. lymphadenopathy
16. prostatomegaly
17. biliary_ductal_dilation
18. cardiomegaly
19. splenomegaly
20. hepatomegaly
21. atherosclerosis
22. ascites
23. pleural_effusion
24. hepatic_steatosis
25. appendicitis
26. gallstones
27. hydronephrosis
28. bowel_obstruction
29. free_air
30. fracture

Labeling rules
- Output a single line of 30 comma-separated values.
- Use 1 if the finding is explicitly present.
- Use 0 if the finding is explicitly ruled out or absent.
- Use -1 if the report is ambiguous, uncertain, or lacks information.

Only return the comma-separated numbers.
Example:  
0,1,-1,-1,1,-1,-1,-1,-1,-1,0,0,0,0,1,0,0,0,-1,0,0,1,0,0,0,0,0,0,0,0
"""  # noqa: W291


def test_the_official_prompt_is_extraction_pys_verbatim(tmp_path):
    """ctrate18 -> SYSTEM_PROMPT_18, greenrfm30 (extraction.py's LABEL_COLUMNS_30) -> SYSTEM_PROMPT_30; the
    default at scale=paper. Another vocabulary gets the same text over its findings."""
    assert official_prompt(load_vocabulary("ctrate18")) == SYSTEM_PROMPT_18
    assert official_prompt(load_vocabulary("greenrfm30")) == SYSTEM_PROMPT_30
    assert (
        "  \n" in SYSTEM_PROMPT_18 and SYSTEM_PROMPT_18.count("Example:  \n") == 1
    )  # the trailing spaces kept
    chexpert = official_prompt(VOCAB)
    assert "following 14 findings" in chexpert and "\n14. support devices\n" in chexpert
    assert "Example:  \n0,1,-1,-1,1,-1,-1,-1,-1,-1,0,0,0,0\n" in chexpert
    default = build(
        "data/labeller/llm", base_url="http://127.0.0.1:9/v1", model="m", cache_path=tmp_path / "c.jsonl"
    )
    assert default.prompt == SYSTEM_PROMPT_18 and default.temperature is None and "official" in repr(default)


def test_official_csv_line_is_parsed_as_extraction_py():
    """``content.strip().split(",")``, tokens stripped; more than N cut to N, fewer refused; only 0 / 1 / -1."""
    vocabulary = load_vocabulary("ctrate18")
    values = ["1", "0", "-1"] * 6
    parsed = parse_csv_line(" " + ", ".join(values) + "\n", vocabulary)
    assert list(parsed) == vocabulary.names and list(parsed.values()) == [1, 0, -1] * 6
    assert (
        parse_csv_line(",".join(values) + ",0, (pleural effusion present)", vocabulary) == parsed
    )  # cut to 18
    for bad in (",".join(values[:17]), ",".join(["yes", *values[1:]]), ",".join(["1.0", *values[1:]]),
                ",".join(values[:17]) + ",0 (explanation)"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_csv_line(bad, vocabulary)


def test_official_prompt_against_the_server(server, tmp_path):
    """The request as extraction.py sends it (system prompt, user f"\\n\\n{report}", no temperature, no JSON
    mode), its CSV answer retried when malformed, -1 for what a report leaves out (= uncertain), and reports
    under 5 characters never sent (no labels, as extraction.py leaves them NA)."""
    vocabulary = load_vocabulary("ctrate18")
    FakeOpenAI.script = ["csv_short", "csv_bad", "garbage", "csv_long"]  # the first report: 4 attempts
    model = labeller(server, tmp_path, vocabulary=vocabulary, prompt="official", temperature=None,
                     concurrency=1, retries=3)  # fmt: skip
    rows = model.label_many(["Small left effusion.", "no effusion seen.", "n/a", "Lungs are clear."])
    assert [r["pleural_effusion"] for r in rows] == [1, 0, None, -1]
    assert set(rows[0].values()) == {1, -1} and rows[0]["cardiomegaly"] == -1  # not mentioned: -1 (uncertain)
    assert all(v is None for v in rows[2].values()), "a report under 5 characters is not labelled"
    assert model.calls == 3 + 3 and "n/a" not in [s["report"].strip() for s in FakeOpenAI.seen]
    body = FakeOpenAI.seen[-1]["body"]
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT_18},
        {"role": "user", "content": "\n\nLungs are clear."},
    ]
    assert "temperature" not in body and "response_format" not in body
    again = labeller(server, tmp_path, vocabulary=vocabulary, prompt="official", temperature=None)
    assert (
        again.label_many(["Small left effusion."])[0]["pleural_effusion"] == 1 and again.calls == 0
    )  # cached
    json_prompt = labeller(server, tmp_path, vocabulary=vocabulary)  # another prompt: asked again
    assert (
        json_prompt.label_many(["Small left effusion."])[0]["pleural_effusion"] == 1
        and json_prompt.calls == 1
    )
    assert (
        FakeOpenAI.seen[-1]["body"]["temperature"] == 0 and "response_format" in FakeOpenAI.seen[-1]["body"]
    )
    with pytest.raises(ValueError, match="prompt must be one of"):
        labeller(server, tmp_path, prompt="csv")
