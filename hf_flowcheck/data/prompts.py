"""Prompt templates per task and the two labelling protocols of ``docs/evaluation.md``.

Prompts come in two styles:

* ``"plain"`` -- ``Knowledge: ...\\nQuestion: ...\\nAnswer:``; the answer continues after a space.
  For QA generation the default is the plain **2-shot** prompt (:func:`qa_fewshot_prompt`) whose
  shots are the fixed records :data:`QA_SHOT_UIDS`; those are excluded from every split.
* ``"chat"`` -- the task instruction and fields as one user message through
  ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.

Protocols (never mix them in one number):

* :func:`paired_examples` -- teacher-forced: prompt + right answer (0), prompt + hallucinated
  answer (1), both with the record's uid. Leaky: report it next to a length-only baseline.
* :func:`label_generated` -- the model answers (greedy, via your ``generate`` callable) and a
  judge labels the answer: 0 correct, 1 hallucinated, ``None`` dropped/failed (counted).
* :func:`natural_examples` -- given responses with human labels (HaluEval general) or
  per-question labels (SelfAware: 1 = unanswerable).

Example:
    >>> from hf_flowcheck.data import Example, qa_fewshot_prompt
    >>> ex = Example("u:9", "qa", {"knowledge": "Paris is in France.", "question": "Where is Paris?"}, "France")
    >>> print(qa_fewshot_prompt(ex).splitlines()[-1])
    Answer:
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .datasets import Example
from .judges import Judge, JudgeResult, as_judge

__all__ = [
    "QA_SHOTS",
    "QA_SHOT_UIDS",
    "TASK_TEMPLATES",
    "GeneratedLabels",
    "LabeledExample",
    "PromptTemplate",
    "clean_generation",
    "format_prompt",
    "generation_prompt",
    "label_generated",
    "make_prompt_fn",
    "natural_examples",
    "paired_examples",
    "qa_fewshot_prompt",
]

PromptStyle = Literal["plain", "chat", "auto"]


@dataclass(frozen=True)
class PromptTemplate:
    """How one task is shown to a model.

    Attributes:
        instruction: Task instruction (chat style only; plain prompts are instruction-free).
        body: ``str.format`` template over the record's ``prompt_fields``.
        answer_prefix: Last line of a plain prompt (``"Answer:"``); the answer follows a space.
    """

    instruction: str
    body: str
    answer_prefix: str


TASK_TEMPLATES: dict[str, PromptTemplate] = {
    "qa": PromptTemplate(
        "Answer the question using the knowledge. Reply with a short answer only.",
        "Knowledge: {knowledge}\nQuestion: {question}",
        "Answer:",
    ),
    "dialogue": PromptTemplate(
        "Write the assistant's next response in the dialogue, consistent with the knowledge.",
        "Knowledge: {knowledge}\nDialogue: {dialogue_history}",
        "Response:",
    ),
    "summarization": PromptTemplate(
        "Summarize the document in one or two sentences.",
        "Document: {document}",
        "Summary:",
    ),
    "general": PromptTemplate("Respond to the user's request.", "Query: {user_query}", "Response:"),
    "qa-closed-book": PromptTemplate(
        "Answer the question. Reply with a short answer only.",
        "Question: {question}",
        "Answer:",
    ),
    "selfaware": PromptTemplate(
        "Answer the question with a short answer. If it has no definite answer, say so.",
        "Question: {question}",
        "Answer:",
    ),
}
"""Task -> :class:`PromptTemplate`. Add entries for custom tasks (or pass ``template=``)."""

QA_SHOTS: tuple[dict[str, str], ...] = (
    {
        "uid": "halueval_qa:0",
        "knowledge": "Arthur's Magazine (1844\u20131846) was an American literary periodical published in "
        "Philadelphia in the 19th century.First for Women is a woman's magazine published by Bauer Media "
        "Group in the USA.",
        "question": "Which magazine was started first Arthur's Magazine or First for Women?",
        "answer": "Arthur's Magazine",
    },
    {
        "uid": "halueval_qa:1",
        "knowledge": "The Oberoi family is an Indian family that is famous for its involvement in hotels, "
        "namely through The Oberoi Group.The Oberoi Group is a hotel company with its head office in Delhi.",
        "question": "The Oberoi family is part of a hotel company that has a head office in what city?",
        "answer": "Delhi",
    },
)
"""The two fixed HaluEval-QA records (lines 1 and 2 of ``qa_data.json``) used as shots."""

QA_SHOT_UIDS: tuple[str, ...] = tuple(s["uid"] for s in QA_SHOTS)
#: Tasks whose generated-protocol prompt is 2-shot with :data:`QA_SHOTS` (closed book: without knowledge).
FEWSHOT_TASKS: tuple[str, ...] = ("qa", "qa-closed-book")
"""uids of the shot records; :func:`hf_flowcheck.data.split_records` excludes them by default."""

DEFAULT_MAX_DOCUMENT_CHARS = 4000


def _template_for(task: str, template: PromptTemplate | None) -> PromptTemplate:
    if template is not None:
        return template
    try:
        return TASK_TEMPLATES[task]
    except KeyError:
        raise ValueError(
            f"No prompt template for task {task!r}; pass template=PromptTemplate(...) or add one to "
            f"TASK_TEMPLATES (known: {', '.join(TASK_TEMPLATES)})."
        ) from None


def _fields(example: Example, max_document_chars: int | None) -> dict[str, str]:
    fields = dict(example.prompt_fields)
    doc = fields.get("document")
    if doc is not None and max_document_chars is not None and len(doc) > max_document_chars:
        cut = doc[:max_document_chars]
        space = cut.rfind(" ")
        fields["document"] = (cut[:space] if space > max_document_chars // 2 else cut) + " ..."
    return fields


def _body(example: Example, tpl: PromptTemplate, max_document_chars: int | None) -> str:
    try:
        return tpl.body.format(**_fields(example, max_document_chars))
    except KeyError as err:
        raise ValueError(
            f"record {example.uid} (task {example.task!r}) lacks prompt field {err.args[0]!r} needed by the "
            f"template {tpl.body!r}; it has {sorted(example.prompt_fields)}."
        ) from None


def format_prompt(
    example: Example,
    *,
    style: PromptStyle = "plain",
    tokenizer: Any = None,
    template: PromptTemplate | None = None,
    shots: Sequence[tuple[Example, str]] = (),
    max_document_chars: int | None = DEFAULT_MAX_DOCUMENT_CHARS,
) -> str:
    """Format the prompt for one record.

    Args:
        example: The record.
        style: ``"plain"``, ``"chat"`` (needs a tokenizer with a chat template) or ``"auto"``
            (chat when ``tokenizer`` has a chat template, else plain).
        tokenizer: Tokenizer for the chat style.
        template: Override the task's :class:`PromptTemplate`.
        shots: ``(record, answer)`` demonstrations placed before the query (plain: blocks
            separated by a blank line; chat: alternating user/assistant turns).
        max_document_chars: Truncate ``document`` fields to this many characters (summarization).

    Returns:
        The prompt text. Plain prompts end with the answer prefix (e.g. ``"Answer:"``), so the
        answer continues after one space; chat prompts end with the generation prompt.

    Raises:
        ValueError: Unknown style, missing chat template, or a missing prompt field.
    """
    tpl = _template_for(example.task, template)
    has_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        style = "chat" if has_chat else "plain"
    if style == "plain":
        blocks = [f"{_body(s, tpl, max_document_chars)}\n{tpl.answer_prefix} {a}" for s, a in shots]
        blocks.append(f"{_body(example, tpl, max_document_chars)}\n{tpl.answer_prefix}")
        return "\n\n".join(blocks)
    if style == "chat":
        if not has_chat:
            raise ValueError(
                "style='chat' needs a tokenizer with a chat_template; pass tokenizer=..., or use "
                "style='plain' (or 'auto' to fall back to plain)."
            )
        messages: list[dict[str, str]] = [{"role": "system", "content": tpl.instruction}]
        for s, a in shots:
            messages += [
                {"role": "user", "content": _body(s, tpl, max_document_chars)},
                {"role": "assistant", "content": a},
            ]
        messages.append({"role": "user", "content": _body(example, tpl, max_document_chars)})
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(out)
    raise ValueError(f"style={style!r} is not supported; use 'plain', 'chat' or 'auto'.")


def _shot_examples(task: str = "qa") -> list[tuple[Example, str]]:
    """The QA shots as ``(record, answer)``; for ``"qa-closed-book"`` without their knowledge."""
    keys = ("question",) if task == "qa-closed-book" else ("knowledge", "question")
    return [(Example(s["uid"], task, {k: s[k] for k in keys}, s["answer"]), s["answer"]) for s in QA_SHOTS]


def qa_fewshot_prompt(example: Example, *, style: PromptStyle = "plain", tokenizer: Any = None) -> str:
    """The default generated-protocol QA prompt: plain 2-shot with the :data:`QA_SHOTS` records.

    A ``"qa-closed-book"`` record gets the same two shots without their knowledge paragraphs.

    Raises:
        ValueError: ``example`` is one of the shot records.
    """
    if example.uid in QA_SHOT_UIDS:
        raise ValueError(f"record {example.uid} is a few-shot demonstration; it is excluded from evaluation.")
    return format_prompt(example, style=style, tokenizer=tokenizer, shots=_shot_examples(example.task))


def generation_prompt(example: Example, *, style: PromptStyle = "plain", tokenizer: Any = None) -> str:
    """Default prompt for the generated protocol: 2-shot for QA (open or closed book), zero-shot for other tasks."""
    if example.task in FEWSHOT_TASKS:
        return qa_fewshot_prompt(example, style=style, tokenizer=tokenizer)
    return format_prompt(example, style=style, tokenizer=tokenizer)


def make_prompt_fn(
    *,
    style: PromptStyle = "plain",
    tokenizer: Any = None,
    fewshot: bool | None = None,
    template: PromptTemplate | None = None,
    max_document_chars: int | None = DEFAULT_MAX_DOCUMENT_CHARS,
) -> Callable[[Example], str]:
    """Build a ``prompt_fn(record) -> str`` for the protocol functions.

    Args:
        style: See :func:`format_prompt`.
        tokenizer: See :func:`format_prompt`.
        fewshot: Use the QA 2-shot prefix; ``None`` = for QA records only.
        template: Override the task template.
        max_document_chars: See :func:`format_prompt`.
    """

    def prompt_fn(example: Example) -> str:
        use_shots = (example.task in FEWSHOT_TASKS) if fewshot is None else fewshot
        if use_shots and example.uid in QA_SHOT_UIDS:
            raise ValueError(f"record {example.uid} is a few-shot demonstration; it is excluded from evaluation.")
        return format_prompt(
            example,
            style=style,
            tokenizer=tokenizer,
            template=template,
            shots=_shot_examples(example.task) if use_shots else (),
            max_document_chars=max_document_chars,
        )

    return prompt_fn


# ---------------------------------------------------------------------------------------------
# Labelled examples
# ---------------------------------------------------------------------------------------------


def _completion(prompt: str, answer: str) -> str:
    return (" " + answer) if prompt.endswith(":") else answer


@dataclass
class LabeledExample:
    """A (prompt, answer, label) triple that keeps its source record's uid.

    Attributes:
        uid: Source record uid (both answers of a pair share it; split on it).
        task: Task name.
        prompt: The prompt text.
        answer: The answer text (stripped).
        label: 0 correct, 1 hallucinated, ``None`` unlabelled (generated protocol only).
        source: ``"right"``/``"hallucinated"`` (paired), ``"generated"`` or ``"natural"``.
        reason: The judge's reason (generated protocol).
        status: The judge's status (``"labelled"``, ``"dropped"``, ``"failed"``).
        completion: Exact text to append to ``prompt`` when teacher-forcing the answer (a
            leading space after a plain prompt's ``"Answer:"``).
    """

    uid: str
    task: str
    prompt: str
    answer: str
    label: int | None
    source: str
    reason: str = ""
    status: str = "labelled"
    completion: str = field(default="")

    def __post_init__(self) -> None:
        if not self.completion:
            self.completion = _completion(self.prompt, self.answer)
        if self.label not in (0, 1, None):
            raise ValueError(f"label={self.label!r} for {self.uid}; must be 0, 1 or None.")

    @property
    def text(self) -> str:
        """``prompt + completion``: the full teacher-forced text."""
        return self.prompt + self.completion

    def __iter__(self):
        return iter((self.prompt, self.answer, self.label))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)


def _prompt_fn_or_default(prompt_fn: Callable[[Example], str] | None, generated: bool) -> Callable[[Example], str]:
    if prompt_fn is not None:
        return prompt_fn
    if generated:
        return lambda ex: generation_prompt(ex)
    return lambda ex: format_prompt(ex)


def paired_examples(
    records: Iterable[Example], *, prompt_fn: Callable[[Example], str] | None = None
) -> list[LabeledExample]:
    """Paired (teacher-forced) protocol: each record gives (prompt, right, 0) and (prompt, hallucinated, 1).

    Args:
        records: Records with both ``reference`` and ``hallucinated`` (HaluEval QA/dialogue/summarization).
        prompt_fn: ``record -> prompt``; default: zero-shot plain :func:`format_prompt`.

    Returns:
        ``2 * len(records)`` examples, right answer first, each with its record's uid.

    Raises:
        ValueError: A record lacks one of the two answers.
    """
    fn = _prompt_fn_or_default(prompt_fn, generated=False)
    out: list[LabeledExample] = []
    for rec in records:
        if rec.reference is None or rec.hallucinated is None:
            raise ValueError(
                f"record {rec.uid} (task {rec.task!r}) has no right/hallucinated answer pair; the paired protocol "
                "needs HaluEval QA, dialogue or summarization records (use natural_examples() or label_generated())."
            )
        prompt = fn(rec)
        out.append(LabeledExample(rec.uid, rec.task, prompt, rec.reference.strip(), 0, "right"))
        out.append(LabeledExample(rec.uid, rec.task, prompt, rec.hallucinated.strip(), 1, "hallucinated"))
    if not out:
        raise ValueError("paired_examples() got no records.")
    return out


def natural_examples(
    records: Iterable[Example], *, prompt_fn: Callable[[Example], str] | None = None
) -> list[LabeledExample]:
    """Natural-label protocol: records that carry their own ``label``.

    HaluEval general: (prompt of the user query, ``chatgpt_response``, human label). SelfAware
    (no response): the answer is empty and the label (1 = unanswerable) is about the question;
    generate answers yourself and keep the label for abstention prediction.

    Raises:
        ValueError: A record has no label.
    """
    fn = _prompt_fn_or_default(prompt_fn, generated=False)
    out = []
    for rec in records:
        if rec.label is None:
            raise ValueError(f"record {rec.uid} has no natural label; use paired_examples() or label_generated().")
        out.append(LabeledExample(rec.uid, rec.task, fn(rec), (rec.response or "").strip(), rec.label, "natural"))
    if not out:
        raise ValueError("natural_examples() got no records.")
    return out


def clean_generation(text: str) -> str:
    """Cut a generated continuation at its first blank/new line and strip it.

    The plain few-shot prompt invites the model to continue with the next ``Knowledge:`` block;
    only the first line is the answer.
    """
    text = text.lstrip()
    return text.split("\n", 1)[0].strip()


@dataclass
class GeneratedLabels:
    """Result of :func:`label_generated`.

    Attributes:
        examples: One :class:`LabeledExample` per judged record (``label`` may be ``None``).
        counts: ``total``, ``correct``, ``hallucinated``, ``dropped`` (judge abstained by design),
            ``failed`` (judge could not answer), ``excluded`` (few-shot records skipped).
    """

    examples: list[LabeledExample]
    counts: dict[str, int]

    @property
    def labelled(self) -> list[LabeledExample]:
        """Only the examples with a 0/1 label."""
        return [e for e in self.examples if e.label is not None]

    @property
    def unlabelled(self) -> list[LabeledExample]:
        """The dropped or failed examples."""
        return [e for e in self.examples if e.label is None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {"counts": dict(self.counts), "examples": [e.to_dict() for e in self.examples]}


def label_generated(
    records: Sequence[Example],
    generate: Callable[[list[str]], list[str]],
    judge: Judge | Callable[..., Any],
    *,
    prompt_fn: Callable[[Example], str] | None = None,
    batch_size: int = 8,
    postprocess: Callable[[str], str] | None = clean_generation,
    progress: Callable[[int, int], None] | None = None,
) -> GeneratedLabels:
    """Generated protocol: the model answers each prompt and ``judge`` labels the answer.

    Args:
        records: Records to answer (few-shot records :data:`QA_SHOT_UIDS` are skipped and counted).
        generate: ``list of prompts -> list of answers`` (greedy decoding is the protocol).
        judge: A :class:`~hf_flowcheck.data.judges.Judge` or plain callable (see ``as_judge``).
        prompt_fn: ``record -> prompt``; default :func:`generation_prompt` (QA: plain 2-shot).
        batch_size: Prompts per ``generate`` call.
        postprocess: Applied to each raw answer (default: first line, stripped); ``None`` keeps it.
        progress: Optional ``callback(done, total)``.

    Returns:
        :class:`GeneratedLabels` with every example (dropped/failed ones have ``label=None``,
        never a guessed label) and the counts.

    Raises:
        ValueError: ``generate`` returned a different number of answers than prompts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    judge_fn = as_judge(judge)
    fn = _prompt_fn_or_default(prompt_fn, generated=True)
    counts = {"total": 0, "correct": 0, "hallucinated": 0, "dropped": 0, "failed": 0, "excluded": 0}
    todo = []
    for rec in records:
        if rec.uid in QA_SHOT_UIDS:
            counts["excluded"] += 1
        else:
            todo.append(rec)
    examples: list[LabeledExample] = []
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = [fn(r) for r in batch]
        answers = list(generate(prompts))
        if len(answers) != len(prompts):
            raise ValueError(
                f"generate() returned {len(answers)} answers for {len(prompts)} prompts; return one per prompt."
            )
        for rec, prompt, raw in zip(batch, prompts, answers):
            if not isinstance(raw, str):
                raise TypeError(f"generate() must return strings, got {type(raw).__name__} for {rec.uid}.")
            answer = postprocess(raw) if postprocess is not None else raw
            refs = rec.references
            result = (
                judge_fn(rec.question, answer, refs if len(refs) != 1 else refs[0], rec.knowledge)
                if refs
                else (judge_fn(rec.question, answer, None, rec.knowledge))
            )
            if not isinstance(result, JudgeResult):
                raise TypeError(f"judge returned {type(result).__name__}; it must return a JudgeResult.")
            counts["total"] += 1
            if result.label == 0:
                counts["correct"] += 1
            elif result.label == 1:
                counts["hallucinated"] += 1
            elif result.status == "failed":
                counts["failed"] += 1
            else:
                counts["dropped"] += 1
            examples.append(
                LabeledExample(
                    rec.uid, rec.task, prompt, answer, result.label, "generated", result.reason, result.status
                )
            )
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    return GeneratedLabels(examples, counts)
