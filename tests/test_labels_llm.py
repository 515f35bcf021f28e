"""The LLM backend against a fake OpenAI-compatible server on loopback that also errs and talks nonsense."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from greenlab.config import build
from greenlab.labels.llm import EndpointUnreachable, LLMError, LLMLabeller, parse_answer
from greenlab.labels.vocabulary import load_vocabulary

VOCAB = load_vocabulary("chexpert14")
SECRET = "sk-test-do-not-log-0123456789"


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers by keyword; ``script`` lists what to do for the next requests: 429, 500, 'garbage',
    'wrong_keys', 'hang'; then (or when empty) a valid answer. Reports containing 'poison' always fail."""

    script: list = []
    seen: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        report = body["messages"][-1]["content"]
        with self.lock:
            FakeOpenAI.seen.append({"auth": self.headers.get("Authorization"), "report": report})
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
        labels = {name: "not_mentioned" for name in VOCAB.names}
        if "effusion" in report:
            labels["pleural_effusion"] = "absent" if "no effusion" in report else "present"
        if "possible pneumonia" in report:
            labels["pneumonia"] = "uncertain"
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
    return build(
        "data/labeller/llm",
        vocabulary=VOCAB,
        base_url=url,
        model="fake-model",
        cache_path=tmp_path / "cache.jsonl",
        api_key_env="FAKE_LLM_KEY",
        backoff_s=0.01,
        **kwargs,
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
        labeller(server, tmp_path, retries=2).label_many(reports, ids=["a", "b", "c", "d", "e"])
    assert "report e" in str(error.value) and SECRET not in str(error.value)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4, "the four good answers are saved"
    resumed = labeller(server, tmp_path)
    assert resumed.label_many(REPORTS) and resumed.calls == 0


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
