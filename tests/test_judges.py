"""Judges: token F1, the reference judge, a local OpenAI-compatible server, a tiny causal LM."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hf_flowcheck.data import (
    CallableJudge,
    CausalLMJudge,
    Example,
    JudgeResult,
    OpenAIChatJudge,
    ReferenceF1Judge,
    as_judge,
    label_generated,
    parse_yes_no,
    token_f1,
)

# --------------------------------------------------------------------------------------------
# token F1 and the reference judge
# --------------------------------------------------------------------------------------------


def test_token_f1_squad_semantics():
    assert token_f1("The Eiffel Tower!", "eiffel tower") == 1.0  # case, punctuation, articles
    assert token_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "Paris") == 0.0
    assert token_f1("a b", "b a") == token_f1("b a", "a b") == 1.0


def test_reference_f1_judge_bands():
    judge = ReferenceF1Judge()
    assert judge("q", "Delhi", "Delhi") == JudgeResult(0, judge("q", "Delhi", "Delhi").reason)
    assert judge("q", "Mumbai", "Delhi").label == 1
    half = judge("q", "New Delhi city", "Delhi")  # F1 = 0.5 -> correct
    assert half.label == 0
    mid = judge("q", "The company is based in Mumbai, not Delhi", "Delhi")
    assert mid.label is None and mid.status == "dropped"
    # several references: best F1 wins
    assert judge("q", "song", ["tune", "song"]).label == 0
    with pytest.raises(ValueError, match="reference"):
        judge("q", "x", None)


def test_reference_judge_never_uses_substring():
    # contains the right string but is a long wrong sentence: must not be labelled correct
    res = ReferenceF1Judge()(
        "Who?", "Not Arthur's Magazine, it was First for Women which was started first", "Arthur's Magazine"
    )
    assert res.label is None


def test_parse_yes_no():
    assert parse_yes_no(" Yes.") == 0 and parse_yes_no("no, it is wrong") == 1
    assert parse_yes_no("Maybe") is None and parse_yes_no("") is None and parse_yes_no("Yesterday") is None


def test_callable_judge_wrapping():
    assert as_judge(lambda q, a, r, k: True)("q", "a", "r").label == 1
    assert as_judge(lambda q, a, r, k: 0)("q", "a", "r").label == 0
    assert as_judge(lambda q, a, r, k: None)("q", "a", "r").status == "dropped"
    with pytest.raises(ValueError, match="return 0"):
        CallableJudge(lambda q, a, r, k: "yes")("q", "a", "r")
    with pytest.raises(ValueError, match="inconsistent"):
        JudgeResult(None, "x", "labelled")


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint on a local test server
# --------------------------------------------------------------------------------------------


class _Server:
    """A local /v1/chat/completions server replaying a script of behaviours."""

    def __init__(self, script):
        self.script = list(script)  # each item: ("reply", text) | ("sleep", seconds, text) | ("status", code)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                step = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if step[0] == "status":
                    self.send_response(step[1])
                    self.end_headers()
                    return
                if step[0] == "sleep":
                    time.sleep(step[1])
                text = step[-1]
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _judge(url, **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("max_retries", 2)
    return OpenAIChatJudge(url, "test-model", sleep=lambda s: None, **kw)


def test_openai_judge_yes_and_no():
    with _Server([("reply", "Yes"), ("reply", "No.")]) as srv:
        judge = _judge(srv.url + "/v1", api_key="sk-test")
        assert judge("Q?", "Paris", "Paris", knowledge="K").label == 0
        assert judge("Q?", "Lyon", "Paris").label == 1
    body = srv.requests[0]
    assert body["model"] == "test-model" and body["temperature"] == 0
    assert (
        "Proposed answer: Paris" in body["messages"][-1]["content"]
        and "Knowledge: K" in body["messages"][-1]["content"]
    )
    assert srv.headers[0].get("Authorization") == "Bearer sk-test"
    assert judge.stats == {"calls": 2, "requests": 2, "retries": 0, "failed": 0, "labelled": 2}


def test_openai_judge_timeout_then_success():
    with _Server([("sleep", 1.5, "Yes"), ("reply", "Yes")]) as srv:
        judge = _judge(srv.url, timeout=0.3)
        res = judge("Q?", "Paris", "Paris")
    assert res.label == 0 and res.status == "labelled"
    assert judge.stats["retries"] == 1 and judge.stats["requests"] == 2 and judge.stats["failed"] == 0


def test_openai_judge_server_error_then_success():
    with _Server([("status", 503), ("reply", "no")]) as srv:
        judge = _judge(srv.url)
        assert judge("Q?", "Lyon", "Paris").label == 1
    assert judge.stats["retries"] == 1


def test_openai_judge_nonsense_is_unlabelled_and_counted():
    backoffs = []
    with _Server([("reply", "I am not sure, perhaps")]) as srv:
        judge = OpenAIChatJudge(srv.url, "m", timeout=2.0, max_retries=2, backoff=0.5, sleep=backoffs.append)
        res = judge("Q?", "Paris", "Paris")
        assert res.label is None and res.status == "failed" and "nonsense" in res.reason
        assert len(srv.requests) == 3  # first try + 2 retries
        recs = [Example(f"u:{i}", "qa", {"knowledge": "K", "question": "Q?"}, "Paris") for i in range(3)]
        out = label_generated(recs, lambda ps: ["Paris"] * len(ps), judge)
    assert backoffs[:2] == [0.5, 1.0]  # exponential backoff
    assert out.counts["failed"] == 3 and out.counts["correct"] == 0 and not out.labelled
    assert judge.stats["failed"] == 4 and judge.stats["labelled"] == 0


def test_openai_judge_auth_error_raises_and_url_forms():
    with _Server([("status", 401)]) as srv, pytest.raises(RuntimeError, match="HTTP 401"):
        _judge(srv.url)("Q?", "a", "b")
    assert OpenAIChatJudge("http://h:1", sleep=lambda s: None).endpoint == "http://h:1/v1/chat/completions"
    assert OpenAIChatJudge("http://h:1/v1/", sleep=lambda s: None).endpoint == "http://h:1/v1/chat/completions"
    full = "http://h:1/api/chat/completions"
    assert OpenAIChatJudge(full, sleep=lambda s: None).endpoint == full
    with pytest.raises(ValueError, match="http"):
        OpenAIChatJudge("h:1")


def test_openai_judge_unreachable_is_failed():
    judge = _judge("http://127.0.0.1:9", timeout=0.5, max_retries=1)  # discard port: refused
    res = judge("Q?", "a", "b")
    assert res.label is None and res.status == "failed" and judge.stats["failed"] == 1


# --------------------------------------------------------------------------------------------
# Causal LM judge on a tiny random model
# --------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "[UNK]",
        "[PAD]",
        "Yes",
        "No",
        "Question",
        "Answer",
        "Reference",
        "Proposed",
        "Knowledge",
        "answer",
        "the",
        "Paris",
        "France",
        "Lyon",
        "Where",
        "is",
        ":",
        "?",
        ".",
    ]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return LlamaForCausalLM(cfg).eval(), _tiny_tokenizer()


def test_causal_lm_judge_valid_and_deterministic(tiny_lm):
    model, tok = tiny_lm
    judge = CausalLMJudge(model, tok)
    assert (judge.yes_id, judge.no_id) == (2, 3)
    first = judge("Where is Paris?", "France", "France", knowledge="Paris is in France.")
    assert first.label in (0, 1) and first.status == "labelled" and "logit" in first.reason
    assert judge("Where is Paris?", "France", "France", knowledge="Paris is in France.") == first
    dropped = CausalLMJudge(model, tok, margin=1e9)("Where is Paris?", "Lyon", "France")
    assert dropped.label is None and dropped.status == "dropped"


def test_causal_lm_judge_token_errors(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="same token"):
        CausalLMJudge(model, tok, yes_token=" Yes", no_token=" Yes")
    with pytest.raises(ValueError, match="unknown token"):
        CausalLMJudge(model, tok, yes_token=" Oui")
    with pytest.raises(ValueError, match="chat_template"):
        CausalLMJudge(model, tok, use_chat_template=True)
