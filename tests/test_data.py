"""Loaders on the real data files, bad lines, prompts, labelling protocols and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_flowcheck.data import (
    DATA_DIR_ENV,
    QA_SHOT_UIDS,
    QA_SHOTS,
    DataFormatError,
    Example,
    JudgeResult,
    ReferenceF1Judge,
    format_prompt,
    generation_prompt,
    label_generated,
    load_halueval,
    load_halueval_dialogue,
    load_halueval_general,
    load_halueval_qa,
    load_halueval_summarization,
    load_hub,
    load_jsonl,
    load_selfaware,
    make_prompt_fn,
    natural_examples,
    paired_examples,
    qa_fewshot_prompt,
    resolve_data_dir,
    select_split,
    split_records,
)

N = 300  # records read from the real files: fast, and enough to exercise the formats


@pytest.fixture(scope="module")
def qa():
    return load_halueval_qa(limit=N)


def _write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


QA_LINE = {"knowledge": "K", "question": "Q?", "right_answer": "A", "hallucinated_answer": "B is it."}

# --------------------------------------------------------------------------------------------
# data directory
# --------------------------------------------------------------------------------------------


def test_resolve_data_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    default = resolve_data_dir()
    assert (default / "halueval" / "qa_data.json").is_file()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        resolve_data_dir()
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load_halueval("qa", tmp_path, limit=1)  # directory exists but has no halueval/


# --------------------------------------------------------------------------------------------
# real files
# --------------------------------------------------------------------------------------------


def test_load_qa_real(qa):
    assert len(qa) == N and qa.n_skipped == 0
    assert qa.uids[:2] == ["halueval_qa:0", "halueval_qa:1"]
    assert len(set(qa.uids)) == N
    r = qa[0]
    assert r.task == "qa" and set(r.prompt_fields) == {"knowledge", "question"}
    assert r.reference == "Arthur's Magazine" and r.hallucinated.startswith("First for Women")
    assert r.label is None and r.response is None
    assert r.question == r.prompt_fields["question"] and r.knowledge == r.prompt_fields["knowledge"]
    json.dumps(r.to_dict())


def test_shots_are_the_real_records(qa):
    for shot in QA_SHOTS:
        rec = next(r for r in qa if r.uid == shot["uid"])
        assert rec.prompt_fields == {"knowledge": shot["knowledge"], "question": shot["question"]}
        assert rec.reference == shot["answer"]
    assert set(QA_SHOT_UIDS) == {s["uid"] for s in QA_SHOTS}


def test_load_dialogue_and_summarization_real():
    d = load_halueval_dialogue(limit=20)
    assert len(d) == 20 and set(d[0].prompt_fields) == {"knowledge", "dialogue_history"}
    assert d[0].reference and d[0].hallucinated
    s = load_halueval_summarization(limit=5)
    assert len(s) == 5 and set(s[0].prompt_fields) == {"document"}
    assert s[0].uid == "halueval_summarization:0"


def test_general_crlf_quirk_real():
    path = resolve_data_dir() / "halueval" / "general_data.json"
    with open(path, "rb") as fh:
        assert fh.readline().endswith(b"\r\n")  # the quirk is really there
    g = load_halueval_general(limit=N)
    assert len(g) == N
    assert {r.label for r in g} == {0, 1}  # label field is "hallucination" (yes/no)
    for r in g:
        assert r.response is not None and not r.response.endswith("\r")
        assert set(r.prompt_fields) == {"user_query"} and r.reference is None
    assert g[0].uid == "halueval_general:0" and g[0].meta["ID"] == "1"


def test_crlf_jsonl_reads_like_lf(tmp_path):
    lines = [json.dumps(QA_LINE), json.dumps({**QA_LINE, "question": "Q2?"})]
    lf = load_jsonl(_write(tmp_path / "lf.jsonl", lines), task="qa", uid_prefix="x")
    crlf = load_jsonl(_write(tmp_path / "crlf.jsonl", lines, "\r\n"), task="qa", uid_prefix="x")
    assert [r.to_dict() for r in lf] == [r.to_dict() for r in crlf]


def test_selfaware_real():
    s = load_selfaware(limit=50)
    assert len(s) == 50 and s[0].uid == "selfaware:1"
    assert all(r.label == 0 for r in s)  # the file lists the answerable questions first
    assert s[0].meta["answers"] == ["song"] and s[0].reference == "song" and s[0].references == ["song"]
    full = load_selfaware()
    assert len(full) == 3369 and sum(r.label for r in full) == 1032  # 1 = unanswerable
    unans = next(r for r in full if r.label == 1)
    assert unans.reference is None and unans.references == []


# --------------------------------------------------------------------------------------------
# bad lines
# --------------------------------------------------------------------------------------------


def _bad_file(tmp_path: Path) -> Path:
    lines = [
        json.dumps(QA_LINE),
        "{not json",
        json.dumps({k: v for k, v in QA_LINE.items() if k != "right_answer"}),
        "",
        json.dumps(QA_LINE),
    ]
    return _write(tmp_path / "bad.jsonl", lines)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path, task="qa")
    err = info.value
    assert err.line == 2 and err.path == str(path)
    assert "bad.jsonl line 2" in str(err) and "on_error='skip'" in str(err)


def test_missing_field_names_field_and_line(tmp_path):
    path = _write(tmp_path / "m.jsonl", [json.dumps(QA_LINE), json.dumps({"knowledge": "K", "question": "Q"})])
    with pytest.raises(DataFormatError, match=r"m\.jsonl line 2: missing field 'right_answer'") as info:
        load_jsonl(path, task="qa")
    assert info.value.field == "right_answer"


def test_skip_mode_counts(tmp_path):
    recs = load_jsonl(_bad_file(tmp_path), task="qa", on_error="skip")
    assert len(recs) == 2 and recs.n_skipped == 2
    assert [line for line, _ in recs.skipped] == [2, 3]
    # uids follow the record index (blank lines are not records), stable under skipping
    assert recs.uids == ["bad:0", "bad:3"]
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(_bad_file(tmp_path), task="qa", on_error="ignore")


def test_label_outside_01_is_an_error(tmp_path):
    lines = [json.dumps({"q": "x", "r": "y", "y": 1}), json.dumps({"q": "x", "r": "y", "y": 2})]
    path = _write(tmp_path / "lab.jsonl", lines)
    fields = {"question": "q", "response": "r", "label": "y"}
    with pytest.raises(DataFormatError, match=r"line 2: label 2 is outside \{0, 1\}"):
        load_jsonl(path, task="custom", fields=fields)
    recs = load_jsonl(path, task="custom", fields=fields, on_error="skip")
    assert len(recs) == 1 and recs[0].label == 1 and recs.n_skipped == 1


def test_empty_result_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="No records loaded"):
        load_jsonl(_write(tmp_path / "e.jsonl", [""]), task="qa")
    only_bad = _write(tmp_path / "b.jsonl", ["{oops"])
    with pytest.raises(ValueError, match="1 bad lines skipped"):
        load_jsonl(only_bad, task="qa", on_error="skip")


def test_jsonl_field_mapping_and_uid(tmp_path):
    rows = [{"id": "a1", "ctx": "C", "q": "Q?", "gold": "G", "bad": "H", "flag": "yes"}]
    path = _write(tmp_path / "mine.jsonl", [json.dumps(r) for r in rows])
    recs = load_jsonl(
        path,
        task="qa",
        fields={
            "uid": "id",
            "knowledge": "ctx",
            "question": "q",
            "reference": "gold",
            "hallucinated": "bad",
            "label": "flag",
        },
    )
    r = recs[0]
    assert r.uid == "mine:a1" and r.prompt_fields == {"knowledge": "C", "question": "Q?"}
    assert (r.reference, r.hallucinated, r.label) == ("G", "H", 1)
    with pytest.raises(ValueError, match="no default field mapping"):
        load_jsonl(path, task="unknown-task")


def test_limit_reads_only_what_it_needs(tmp_path):
    lines = [json.dumps(QA_LINE)] * 3 + ["{broken"]
    recs = load_jsonl(_write(tmp_path / "l.jsonl", lines), task="qa", limit=3)
    assert len(recs) == 3  # never reached the broken line


def test_hub_loader_code_path_with_injected_loader():
    rows = [dict(QA_LINE, question=f"Q{i}?") for i in range(4)]
    calls = {}

    def fake_load_dataset(repo, config, split, revision=None):
        calls.update(repo=repo, config=config, split=split)
        return rows

    recs = load_hub("qa", limit=3, load_dataset=fake_load_dataset)
    assert calls == {"repo": "pminervini/HaluEval", "config": "qa", "split": "data"}
    assert recs.uids == ["halueval_qa:0", "halueval_qa:1", "halueval_qa:2"]
    with pytest.raises(ValueError, match="repo_id"):
        load_hub("selfaware", load_dataset=fake_load_dataset)


@pytest.mark.hub
def test_hub_loader_real():  # pragma: no cover - needs network
    pytest.importorskip("datasets")
    try:
        recs = load_hub("qa", limit=5)
    except Exception as err:  # offline machines
        pytest.skip(f"Hub unreachable: {err}")
    local = load_halueval_qa(limit=5)
    assert [r.to_dict()["reference"] for r in recs] == [r.reference for r in local]


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


def test_qa_fewshot_prompt_format(qa):
    rec = qa[5]
    p = qa_fewshot_prompt(rec)
    blocks = p.split("\n\n")
    assert len(blocks) == 3
    assert (
        blocks[0]
        == f"Knowledge: {QA_SHOTS[0]['knowledge']}\nQuestion: {QA_SHOTS[0]['question']}\nAnswer: Arthur's Magazine"
    )
    assert blocks[1].endswith("\nAnswer: Delhi")
    assert blocks[2] == f"Knowledge: {rec.knowledge}\nQuestion: {rec.question}\nAnswer:"
    assert generation_prompt(rec) == p
    with pytest.raises(ValueError, match="few-shot"):
        qa_fewshot_prompt(qa[0])


class _ChatTok:
    chat_template = "dummy"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_and_plain_styles(qa):
    rec = qa[5]
    chat = format_prompt(rec, style="chat", tokenizer=_ChatTok())
    assert chat.startswith("<system>Answer the question") and chat.endswith("<assistant>")
    assert f"Question: {rec.question}" in chat
    assert format_prompt(rec, style="auto", tokenizer=None) == format_prompt(rec)
    assert format_prompt(rec, style="auto", tokenizer=_ChatTok()) == chat
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt(rec, style="chat", tokenizer=object())
    fewshot_chat = make_prompt_fn(style="chat", tokenizer=_ChatTok())(rec)
    assert "<assistant>Arthur's Magazine</assistant>" in fewshot_chat


def test_summarization_document_truncated():
    doc = "word " * 5000
    rec = Example("s:0", "summarization", {"document": doc}, "sum", "bad")
    p = format_prompt(rec, max_document_chars=1000)
    assert len(p) < 1100 and p.endswith("...\nSummary:")


# --------------------------------------------------------------------------------------------
# protocols
# --------------------------------------------------------------------------------------------


def test_paired_examples(qa):
    pairs = paired_examples(qa[:10])
    assert len(pairs) == 20
    for right, hall in zip(pairs[::2], pairs[1::2]):
        assert right.uid == hall.uid and right.prompt == hall.prompt
        assert (right.label, hall.label, right.source, hall.source) == (0, 1, "right", "hallucinated")
        assert right.prompt.endswith("Answer:") and right.completion == " " + right.answer
        prompt, answer, label = right
        assert (prompt, answer, label) == (right.prompt, right.answer, 0)
    with pytest.raises(ValueError, match="paired protocol"):
        paired_examples(load_halueval_general(limit=2))


def test_natural_examples_general():
    g = load_halueval_general(limit=20)
    ex = natural_examples(g)
    assert [e.label for e in ex] == [r.label for r in g]
    assert ex[0].answer == g[0].response.strip() and ex[0].prompt.startswith("Query: ")
    with pytest.raises(ValueError, match="natural label"):
        natural_examples(load_halueval_qa(limit=2))


def test_label_generated_with_f1_judge(qa):
    recs = qa[:8]  # includes the two shot records

    def generate(prompts):
        out = []
        for p in prompts:
            rec = next(r for r in recs if p.endswith(f"Question: {r.question}\nAnswer:"))
            i = recs.index(rec)
            # correct, hallucinated, or half right (dropped), plus few-shot style continuation
            out.append(
                [rec.reference, "Zanzibar", rec.reference + " and many other things too"][i % 3] + "\n\nKnowledge: x"
            )
        return out

    res = label_generated(recs, generate, ReferenceF1Judge(), batch_size=3)
    assert res.counts["excluded"] == 2 and res.counts["total"] == 6
    assert res.counts["correct"] + res.counts["hallucinated"] + res.counts["dropped"] + res.counts["failed"] == 6
    assert res.counts["dropped"] >= 1 and res.counts["hallucinated"] >= 1 and res.counts["correct"] >= 1
    assert all("\n" not in e.answer for e in res.examples)
    assert all(e.label is None for e in res.unlabelled) and len(res.labelled) == 6 - res.counts["dropped"]
    json.dumps(res.to_dict())
    with pytest.raises(ValueError, match="returned 0 answers"):
        label_generated(recs, lambda ps: [], ReferenceF1Judge())


def test_label_generated_plain_callable_judge(qa):
    res = label_generated(qa[2:6], lambda ps: ["x"] * len(ps), lambda q, a, r, k: None)
    assert res.counts["dropped"] == 4 and not res.labelled
    res = label_generated(qa[2:6], lambda ps: ["x"] * len(ps), lambda q, a, r, k: JudgeResult(None, "boom", "failed"))
    assert res.counts["failed"] == 4


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def test_split_grouped_seeded_and_excludes_shots(qa):
    pairs = paired_examples(qa)
    split = split_records([p.uid for p in pairs], seed=0)
    n = N - len(QA_SHOT_UIDS)
    assert (len(split.train), len(split.validation), len(split.test)) == (
        round(0.7 * n),
        round(0.1 * n),
        n - round(0.7 * n) - round(0.1 * n),
    )
    all_uids = set(split.train) | set(split.validation) | set(split.test)
    assert len(all_uids) == n and not all_uids & set(QA_SHOT_UIDS)
    assert not set(split.train) & set(split.test) and not set(split.train) & set(split.validation)
    for name in ("train", "validation", "test"):
        part = select_split(pairs, split, name)
        labels_by_uid: dict[str, list[int]] = {}
        for p in part:
            labels_by_uid.setdefault(p.uid, []).append(p.label)
        assert all(sorted(v) == [0, 1] for v in labels_by_uid.values())  # both answers together
    assert split.split_of(QA_SHOT_UIDS[0]) is None
    # same seed -> same split, whatever the input order; other seed -> other split
    assert split_records(list(reversed(qa.uids)), seed=0) == split
    assert split_records(qa.uids, seed=1).test != split.test
    json.dumps(split.to_dict())


def test_split_errors():
    with pytest.raises(ValueError, match="would be empty"):
        split_records(["a", "b", "c"])
    with pytest.raises(ValueError, match="fractions"):
        split_records([str(i) for i in range(100)], fractions=(0.5, 0.5, 0.5))


def test_split_without_keeps_every_other_uid_in_place():
    from hf_flowcheck.data.splits import split_records

    uids = [f"u{i}" for i in range(40)]
    full = split_records(uids, seed=3)
    cut = full.without([full.train[0], full.test[1], "not-there"])
    assert cut.train == full.train[1:] and cut.validation == full.validation
    assert cut.test == full.test[:1] + full.test[2:] and cut.seed == 3
