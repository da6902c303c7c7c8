"""The robustness corpus: its tasks, prompt styles, judge rule and resumable generation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import make_tiny_model
from test_terminators import VocabCharTokenizer
from test_workflows_extract import CharTokenizer

from hf_flowcheck.data import Example
from hf_flowcheck.data.corpus import (
    CORPUS_TASKS,
    EXCLUDED_SOURCES,
    PROMPT_STYLES,
    answer_line,
    assign_cells,
    check_style,
    check_task,
    corpus_prompt,
    judge_answer,
    load_task_records,
    whole_reply,
)
from hf_flowcheck.fingerprint import model_fingerprint
from hf_flowcheck.workflows.corpus import cell_path, generate_corpus, read_corpus


def qa(answers, **meta):
    return Example("t:1", "triviaqa", {"question": "Who wrote Hamlet?"}, meta={"answers": answers, **meta})


@pytest.mark.parametrize(
    "answer, label",
    [
        ("William Shakespeare", 0),
        ("The play Hamlet was written by William Shakespeare in 1600.", 0),  # a sentence: alias inside
        ("Shakespeare", 0),  # token F1 0.67 against the full name
        ("Christopher Marlowe", 1),
        ("Shakespeare's contemporary Marlowe", 1),  # "shakespeares" is not the alias word
        ("", None),
        ("I don't know.", None),  # abstaining on an answerable question is not a hallucination
    ],
)
def test_judge_rule(answer, label):
    assert judge_answer(qa(["William Shakespeare", "Shakespeare"][:1]), answer).label == label


def test_judge_unanswerable_and_false_belief():
    ua = qa([], unanswerable=True)
    assert judge_answer(ua, "There is no definite answer to that.").label == 0
    assert judge_answer(ua, "It is 42.").label == 1
    tq = qa(["Nothing happens"], incorrect_answers=["You grow watermelons in your stomach"])
    assert judge_answer(tq, "Nothing happens to you.").label == 0
    assert judge_answer(tq, "You grow watermelons in your stomach.").label == 1


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="chat-system"):
        check_style("chat-zero")
    with pytest.raises(ValueError, match="triviaqa"):
        check_task("no-such-task")


def test_reserved_sets_are_kept_out():
    def reserved(source: str) -> bool:
        return any(x in source.lower() for x in EXCLUDED_SOURCES)

    assert not any(reserved(t.file) for t in CORPUS_TASKS.values())
    recs = load_task_records("selfaware")
    assert recs and not any(reserved(r.meta["source"]) for r in recs)
    assert {r.meta["unanswerable"] for r in recs} == {True, False}
    from hf_flowcheck.workflows.answers import load_answer_records

    old_style, _ = load_answer_records("selfaware", None, seed=0, limit=None)  # `flowcheck answers` too
    assert old_style and not any(reserved(r.meta.get("source", "")) for r in old_style)


@pytest.mark.parametrize("task", [t for t in CORPUS_TASKS if t != "halueval-qa"])
def test_every_task_loads_with_references(task):
    recs = load_task_records(task)
    assert len(recs) >= 500
    assert all(r.question for r in recs[:50])
    assert all(r.references or r.meta.get("unanswerable") for r in recs[:50])
    assert (recs[0].knowledge is not None) == CORPUS_TASKS[task].passage
    assert [r.uid for r in load_task_records(task, seed=0)[:5]] == [r.uid for r in recs[:5]]  # seeded


def test_assign_cells_balanced_and_disjoint():
    recs = [qa(["x"]) for _ in range(23)]
    cells = assign_cells(recs)
    sizes = [len(v) for v in cells.values()]
    assert set(cells) == set(PROMPT_STYLES) and sum(sizes) == 23 and max(sizes) - min(sizes) <= 1


def test_plain_prompts_and_answer_views():
    ex = Example("p:1", "halueval-qa", {"knowledge": "K.", "question": "Q?"}, meta={"answers": ["a"]})
    assert corpus_prompt(ex, "plain") == "Knowledge: K.\nQuestion: Q?\nAnswer:"
    few = corpus_prompt(ex, "plain-fewshot")
    assert few.count("Question:") == 3 and few.endswith("Question: Q?\nAnswer:")
    assert corpus_prompt(qa(["x"]), "plain-fewshot").count("Knowledge:") == 0
    with pytest.raises(ValueError, match="chat template"):
        corpus_prompt(ex, "chat")
    assert answer_line("The answer is:\nParis\nQuestion: next") == "The answer is: Paris"
    assert whole_reply(" Paris is\n the capital. ") == "Paris is the capital."


class ChatCharTokenizer(CharTokenizer):
    chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def test_chat_styles():
    tok = ChatCharTokenizer()
    assert corpus_prompt(qa(["x"]), "chat", tok).startswith("user: Answer the question.")
    assert corpus_prompt(qa(["x"]), "chat-system", tok).startswith("system: ")
    few = corpus_prompt(qa(["x"]), "chat-fewshot", tok)
    assert few.count("assistant: ") == 2 and few.endswith("assistant:")


def test_generate_corpus_resumes_in_rounds(tmp_path, monkeypatch):
    import hf_flowcheck.workflows.corpus as wc

    monkeypatch.setattr(wc, "GENERATION_CAPS", {"chat": 4, "plain": 3})
    model = make_tiny_model("llama")
    tok = ChatCharTokenizer()
    fp = model_fingerprint(model)
    first = generate_corpus(model, tok, tmp_path, fingerprint=fp, tasks=["popqa"], per_cell=2, per_round=1)
    assert set(first) == {("popqa", s) for s in PROMPT_STYLES} and set(first.values()) == {2}
    more = generate_corpus(model, tok, tmp_path, fingerprint=fp, tasks=["popqa"], per_cell=3, per_round=2)
    assert set(more.values()) == {3}
    files = read_corpus(tmp_path)
    assert len(files) == len(PROMPT_STYLES)
    for f in files:
        for r in f.records:
            assert (r.task, r.style) == ("popqa", f.header["dataset"]["style"])
            assert r.stop in ("eos", "stop", "max_new_tokens")
    line = json.loads(cell_path(tmp_path, "popqa", "chat").read_text().splitlines()[1])
    assert line["task"] == "popqa" and line["style"] == "chat"
    with pytest.raises(ValueError, match="known"):
        read_corpus(tmp_path, tasks=["no-such-task"])


class VocabChatTokenizer(VocabCharTokenizer, ChatCharTokenizer):
    """A chat template and the vocabulary methods the token table reads."""


def test_answer_views_are_prefixes_of_the_one_generation():
    from hf_flowcheck.workflows.answers import AnswerRecord
    from hf_flowcheck.workflows.corpus import answer_view

    tok = VocabChatTokenizer()
    gen = tok("\nParis\nQuestion: x", add_special_tokens=False)["input_ids"]
    rec = AnswerRecord("u", "p", gen, 6, "", "Paris", 0, "", style="plain", stop="max_new_tokens")
    newline = answer_view(rec, "newline", tok)
    assert tok.decode(newline.gen_ids) == "\nParis\n"  # the leading newline does not end it
    assert answer_view(rec, "primary", tok).gen_ids == newline.gen_ids
    assert answer_view(rec, "eos", tok) is None  # the model did not end it
    assert answer_view(rec, "cut", tok).gen_ids == gen[:6]
    chat = dataclasses.replace(rec, style="chat", stop="eos")
    assert answer_view(chat, "eos", tok).gen_ids == gen == answer_view(chat, "primary", tok).gen_ids
    short = dataclasses.replace(chat, gen_ids=gen[:3])
    assert answer_view(short, "cut", tok) is None
    with pytest.raises(ValueError, match="primary"):
        answer_view(rec, "stop", tok)
