"""The robustness corpus: tasks, prompt styles and answer ends that look like use.

A detector trained on one prompt format and one dataset does not transfer (docs/evaluation.md).
This module owns the *definition* of the training corpus built from the model's own answers:

* **tasks** (:data:`CORPUS_TASKS`): passage QA (HaluEval-QA), closed-book factual QA with alias
  lists (TriviaQA, WebQuestions), long-tail entity QA (PopQA, EntityQuestions), multi-hop QA
  (HotpotQA closed-book and with its supporting paragraphs), unanswerable questions (SelfAware,
  without its SQuAD-sourced questions), and false-belief questions (TruthfulQA, evaluation only);
* **prompt styles** (:data:`PROMPT_STYLES`): chat template zero-shot, with a system prompt, with
  few-shot turns; plain few-shot; plain zero-shot;
* **answer ends** (:data:`ANSWER_ENDS`): the model's own end of turn (EOS), a newline stop, a
  ``max_new_tokens`` cut.

Each record is assigned one (style, end) *cell* from its position in a seeded permutation, so
every cell of every task grows together and any prefix of a cell is a random sample of the task.

The judge (:func:`judge_answer`) is a documented rule: correct when a normalised reference alias
occurs in the normalised answer as whole words, or the best token F1 against a reference is at
least 0.5; an answer that abstains is unlabelled on answerable questions and correct on
unanswerable ones; an answer to an unanswerable question that does not abstain is hallucinated.

SQuAD (any version) and Natural Questions are kept out on purpose: they are reserved for
evaluation outside the project. SelfAware's answerable questions partly come from SQuAD; those
(``source`` ``squadqa_*``) are dropped here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Example, load_halueval, resolve_data_dir
from .judges import JudgeResult, normalize_answer, token_f1
from .prompts import QA_SHOTS

__all__ = [
    "ANSWER_ENDS",
    "CORPUS_TASKS",
    "EXCLUDED_SOURCES",
    "PROMPT_STYLES",
    "AnswerEnd",
    "CorpusTask",
    "answer_line",
    "assign_cells",
    "check_end",
    "check_style",
    "check_task",
    "corpus_prompt",
    "judge_answer",
    "load_task_records",
    "postprocess_for",
    "whole_reply",
]

EXCLUDED_SOURCES = ("squad",)
"""Substrings of a record's ``source`` that keep it out of the corpus (reserved evaluation sets)."""


@dataclass(frozen=True)
class CorpusTask:
    """One task of the corpus.

    Attributes:
        name: Task name recorded with every answer.
        kind: What the task probes (``"passage-qa"``, ``"closed-book"``, ``"long-tail"``, ...).
        file: Path under the data directory.
        passage: Whether the prompt carries a passage (``knowledge``).
        eval_only: Never used for training or selection (TruthfulQA's canary asks so).
    """

    name: str
    kind: str
    file: str
    passage: bool = False
    eval_only: bool = False


CORPUS_TASKS: dict[str, CorpusTask] = {
    t.name: t
    for t in (
        CorpusTask("halueval-qa", "passage-qa", "halueval/qa_data.json", passage=True),
        CorpusTask("triviaqa", "closed-book", "triviaqa/triviaqa_unfiltered-dev.jsonl"),
        CorpusTask("webquestions", "closed-book", "webquestions/webquestions_train.jsonl"),
        CorpusTask("popqa", "long-tail", "popqa/popqa_first1000_with_paragraphs.jsonl"),
        CorpusTask("entityquestions", "long-tail", "entityquestions/entityquestions_dev.jsonl"),
        CorpusTask("hotpotqa", "multi-hop", "hotpotqa/hotpotqa_dev_closedbook.jsonl"),
        CorpusTask(
            "hotpotqa-passage", "multi-hop-passage", "hotpotqa/hotpotqa_dev_distractor_supporting.jsonl", passage=True
        ),
        CorpusTask("selfaware", "unanswerable", "selfaware/SelfAware.json"),
        CorpusTask("truthfulqa", "false-belief", "truthfulqa/truthfulqa_generation.jsonl", eval_only=True),
    )
}
"""Task name -> :class:`CorpusTask`. Dialogue is not here: no reference rule judges a free reply."""

PROMPT_STYLES: tuple[str, ...] = ("chat", "chat-system", "chat-fewshot", "plain-fewshot", "plain")
"""Prompt styles: chat template zero-shot / with a system prompt / with few-shot turns; plain 2-shot; plain."""


@dataclass(frozen=True)
class AnswerEnd:
    """How an answer ends, seen as a view of one greedy generation.

    Greedy decoding is deterministic, so the answer a newline stop or a ``max_new_tokens`` cut
    would have produced is a prefix of the one unstopped generation: the corpus generates once per
    record and derives the ends from it (:func:`answer_views`).

    Attributes:
        name: ``"eos"`` (the model's own end of turn), ``"newline"`` (the first line and its newline)
            or ``"cut"`` (the first ``cut_tokens`` tokens).
        description: What a user would have done to get this end.
    """

    name: str
    description: str


ANSWER_ENDS: dict[str, AnswerEnd] = {
    "eos": AnswerEnd("eos", "generate() until the model's end of turn"),
    "newline": AnswerEnd("newline", "a stopping criterion at the first newline after text"),
    "cut": AnswerEnd("cut", "max_new_tokens reached mid-answer"),
}
"""End name -> :class:`AnswerEnd`."""

CUT_TOKENS = 6
"""Tokens kept by the ``cut`` view (shorter answers have no cut view)."""

GENERATION_CAPS = {"chat": 64, "plain": 24}
"""``max_new_tokens`` per style family: chat answers run to their end of turn; plain ones past their line."""

SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's question truthfully and concisely."
_INSTRUCTION = "Answer the question. Reply with a short answer only."
_PASSAGE_INSTRUCTION = "Answer the question using the passage. Reply with a short answer only."

# Hand-written closed-book shots: no record of any corpus or reserved set.
_CLOSED_SHOTS = (
    ("What is the capital city of Australia?", "Canberra"),
    ("Who wrote the novel Pride and Prejudice?", "Jane Austen"),
)
_PASSAGE_SHOTS = tuple((s["knowledge"], s["question"], s["answer"]) for s in QA_SHOTS)

_ABSTAIN = re.compile(
    r"\b(i don'?t know|i do not know|i'?m not sure|i am not sure|not sure|cannot (be )?(determine|answer|know|say)|"
    r"can'?t (be )?(determine|answer|know|say)|no (definite|definitive|clear|single|certain) answer|unknown|"
    r"impossible to (say|know|determine|answer)|not possible to (say|know|determine|answer)|it depends|"
    r"there is no (way|answer)|unanswerable|no one knows|nobody knows)\b",
    re.IGNORECASE,
)


def _known(kind: str, name: str, known: Sequence[str]) -> str:
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; the corpus knows {', '.join(known)}.")
    return name


def check_task(name: str) -> CorpusTask:
    """The task called ``name``; an unknown name is an error that lists the known ones."""
    return CORPUS_TASKS[_known("task", name, tuple(CORPUS_TASKS))]


def check_style(name: str) -> str:
    """``name`` if it is a prompt style of the corpus; otherwise an error listing them."""
    return _known("prompt style", name, PROMPT_STYLES)


def check_end(name: str) -> AnswerEnd:
    """The answer end called ``name``; otherwise an error listing them."""
    return ANSWER_ENDS[_known("answer end", name, tuple(ANSWER_ENDS))]


def assign_cells(records: Sequence[Example]) -> dict[str, list[Example]]:
    """Deal ``records`` (already permuted) round-robin into the prompt styles."""
    out: dict[str, list[Example]] = {st: [] for st in PROMPT_STYLES}
    for i, rec in enumerate(records):
        out[PROMPT_STYLES[i % len(PROMPT_STYLES)]].append(rec)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _qa(uid: str, task: str, question: str, answers: Sequence[str], *, knowledge: str | None = None, **meta: Any):
    fields = {"question": question}
    if knowledge is not None:
        fields["knowledge"] = knowledge
    answers = [str(a) for a in answers]
    return Example(uid, task, fields, reference=answers[0] if answers else None, meta={"answers": answers, **meta})


def load_task_records(name: str, data_dir: str | None = None, *, seed: int = 0) -> list[Example]:
    """The records of corpus task ``name`` in a seeded permutation (any prefix is a random sample).

    Args:
        name: A key of :data:`CORPUS_TASKS`.
        data_dir: The data directory (see :func:`hf_flowcheck.data.resolve_data_dir`).
        seed: Permutation seed.

    Returns:
        Examples whose ``meta["answers"]`` holds every reference alias; SelfAware's carry
        ``meta["unanswerable"]``; TruthfulQA's ``meta["incorrect_answers"]``.

    Raises:
        ValueError: Unknown task (the message lists the known ones).
    """
    task = check_task(name)
    root = resolve_data_dir(data_dir)
    recs: list[Example] = []
    if name == "halueval-qa":
        shot_uids = {s["uid"] for s in QA_SHOTS}
        for r in load_halueval("qa", data_dir):
            if r.uid not in shot_uids:
                recs.append(_qa(r.uid, name, r.question, [r.reference], knowledge=r.knowledge))
    elif name == "selfaware":
        doc = json.loads((root / task.file).read_text(encoding="utf-8"))
        for obj in doc["example"]:
            source = str(obj.get("source", ""))
            if any(s in source.lower() for s in EXCLUDED_SOURCES):
                continue
            unanswerable = not obj["answerable"]
            recs.append(
                _qa(
                    f"selfaware:{obj['question_id']}",
                    name,
                    obj["question"],
                    obj.get("answer") or [],
                    unanswerable=unanswerable,
                    source=source,
                )
            )
    elif name == "truthfulqa":
        for obj in _read_jsonl(root / task.file):
            recs.append(
                _qa(
                    obj["id"],
                    name,
                    obj["question"],
                    obj["correct_answers"],
                    incorrect_answers=list(obj["incorrect_answers"]),
                )
            )
    else:
        for obj in _read_jsonl(root / task.file):
            knowledge = obj.get("context") if task.passage else None
            recs.append(_qa(obj["id"], name, obj["question"], obj["answers"], knowledge=knowledge))
    order = np.random.default_rng(seed).permutation(len(recs)).tolist()
    return [recs[i] for i in order]


def _user_text(ex: Example, *, instruct: bool) -> str:
    head = ""
    if ex.knowledge is not None:
        head = f"Passage: {ex.knowledge}\n"
    body = f"{head}Question: {ex.question}"
    if not instruct:
        return body
    return f"{_PASSAGE_INSTRUCTION if ex.knowledge is not None else _INSTRUCTION}\n\n{body}"


def _plain_block(question: str, knowledge: str | None, answer: str | None) -> str:
    lines = ([f"Knowledge: {knowledge}"] if knowledge is not None else []) + [f"Question: {question}", "Answer:"]
    text = "\n".join(lines)
    return text if answer is None else f"{text} {answer}"


def corpus_prompt(ex: Example, style: str, tokenizer: Any = None) -> str:
    """The prompt text of ``ex`` in prompt style ``style``.

    Args:
        ex: A corpus record.
        style: One of :data:`PROMPT_STYLES`.
        tokenizer: Needed by the chat styles (its chat template).

    Returns:
        The prompt; chat prompts end with the generation prompt, plain ones with ``"Answer:"``.

    Raises:
        ValueError: Unknown style, or a chat style without a tokenizer that has a chat template.
    """
    check_style(style)
    passage = ex.knowledge is not None
    if style.startswith("plain"):
        blocks = []
        if style == "plain-fewshot":
            if passage:
                blocks = [_plain_block(q, k, a) for k, q, a in _PASSAGE_SHOTS]
            else:
                blocks = [_plain_block(q, None, a) for q, a in _CLOSED_SHOTS]
        return "\n\n".join([*blocks, _plain_block(ex.question, ex.knowledge, None)])
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt style {style!r} needs a tokenizer with a chat template; use 'plain' or 'plain-fewshot'."
        )
    messages: list[dict[str, str]] = []
    if style == "chat-system":
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
        messages.append({"role": "user", "content": _user_text(ex, instruct=False)})
    else:
        if style == "chat-fewshot":
            shots = (
                [(Example("shot", "qa", {"knowledge": k, "question": q}), a) for k, q, a in _PASSAGE_SHOTS]
                if passage
                else [(Example("shot", "qa", {"question": q}), a) for q, a in _CLOSED_SHOTS]
            )
            for shot, answer in shots:
                messages.append({"role": "user", "content": _user_text(shot, instruct=True)})
                messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": _user_text(ex, instruct=True)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _contains(answer_norm: str, alias: str) -> bool:
    alias_norm = normalize_answer(alias)
    return bool(alias_norm) and re.search(rf"(^| ){re.escape(alias_norm)}( |$)", answer_norm) is not None


def judge_answer(ex: Example, answer: str) -> JudgeResult:
    """Label the model's ``answer`` to ``ex`` by the corpus rule (module docstring).

    Returns:
        ``JudgeResult``: 0 correct, 1 hallucinated, ``None`` when the answer is empty or abstains
        on an answerable question.
    """
    norm = normalize_answer(answer)
    if not norm:
        return JudgeResult(None, "empty answer", "dropped")
    abstains = _ABSTAIN.search(answer) is not None
    if ex.meta.get("unanswerable"):
        return (
            JudgeResult(0, "abstained on an unanswerable question")
            if abstains
            else JudgeResult(1, "answered an unanswerable question")
        )
    refs = ex.references
    if not refs:
        return JudgeResult(None, "no reference", "failed")

    def match(aliases: Sequence[str]) -> float:
        if any(_contains(norm, a) for a in aliases):
            return 1.0
        return max(token_f1(answer, a) for a in aliases)

    best = match(refs)
    wrong = ex.meta.get("incorrect_answers")
    if wrong:  # TruthfulQA: closer to a correct than to an incorrect answer
        worst = match(wrong)
        if best == worst:
            return JudgeResult(None, f"as close to a correct ({best:.2f}) as to an incorrect answer", "dropped")
        return JudgeResult(int(worst > best), f"match correct {best:.2f}, incorrect {worst:.2f}")
    if best >= 0.5:
        return JudgeResult(0, "alias in answer" if best == 1.0 else f"token F1 {best:.3f} >= 0.5")
    if abstains:
        return JudgeResult(None, "abstained", "dropped")
    return JudgeResult(1, f"no alias in answer, token F1 {best:.3f}")


judge_answer.takes_example = True  # type: ignore[attr-defined]  # generate_answers passes the whole record


def postprocess_for(style: str) -> Callable[[str], str]:
    """Raw continuation -> the judged answer: the first line for plain prompts, the whole reply for chat."""
    if check_style(style).startswith("plain"):
        return answer_line
    return whole_reply


def answer_line(text: str) -> str:
    """A plain continuation's answer: its first non-empty line, joined with the next when it is a lead-in.

    ``"The answer is:\nParis"`` -> ``"The answer is: Paris"``.
    """
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return ""
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def whole_reply(text: str) -> str:
    """A chat reply as one line: its words joined by single spaces."""
    return " ".join(text.split())
