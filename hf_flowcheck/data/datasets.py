"""Dataset records and loaders for HaluEval, SelfAware, local JSON Lines and Hub datasets.

Every loader returns a :class:`RecordList` of :class:`Example` records. One record holds one
*source* item (one HaluEval line, one SelfAware question) with everything needed to build either
labelling protocol of ``docs/evaluation.md``:

* **paired** (teacher-forced): ``reference`` (right answer, label 0) and ``hallucinated``
  (hallucinated answer, label 1) -- see :func:`hf_flowcheck.data.paired_examples`;
* **generated**: the model answers ``prompt_fields`` itself and a judge compares the answer with
  ``reference`` -- see :func:`hf_flowcheck.data.label_generated`;
* **natural labels**: ``response`` with a human ``label`` (HaluEval general) or a per-question
  ``label`` (SelfAware, 1 = unanswerable) -- see :func:`hf_flowcheck.data.natural_examples`.

Example:
    >>> from hf_flowcheck.data import load_halueval
    >>> records = load_halueval("qa", limit=3)  # doctest: +SKIP
    >>> records[0].uid, records[0].reference  # doctest: +SKIP
    ('halueval_qa:0', "Arthur's Magazine")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from hf_flowcheck.errors import DataFormatError

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "HALUEVAL_FILES",
    "HUB_DATASETS",
    "TASK_FIELDS",
    "DataFormatError",
    "Example",
    "RecordList",
    "load_by_name",
    "load_halueval",
    "load_halueval_dialogue",
    "load_halueval_general",
    "load_halueval_qa",
    "load_halueval_summarization",
    "load_hub",
    "load_jsonl",
    "load_selfaware",
    "parse_label",
    "resolve_data_dir",
]

DATA_DIR_ENV = "HF_FLOWCHECK_DATA"
"""Environment variable naming the data directory (holding ``halueval/`` and ``selfaware/``)."""

HALUEVAL_FILES: dict[str, str] = {
    "qa": "halueval/qa_data.json",
    "dialogue": "halueval/dialogue_data.json",
    "summarization": "halueval/summarization_data.json",
    "general": "halueval/general_data.json",
}
"""HaluEval task name -> path of its JSON Lines file relative to the data directory."""

SELFAWARE_FILE = "selfaware/SelfAware.json"

HUB_DATASETS: dict[str, tuple[str, str, str]] = {
    "qa": ("pminervini/HaluEval", "qa", "data"),
    "dialogue": ("pminervini/HaluEval", "dialogue", "data"),
    "summarization": ("pminervini/HaluEval", "summarization", "data"),
    "general": ("pminervini/HaluEval", "general", "data"),
}
"""Task -> ``(repo_id, config_name, split)`` of the Hub mirror of the official HaluEval files."""

# Role -> source field name. Roles: "uid", "reference", "hallucinated", "response", "label",
# "answers"; every other role is a prompt field (kept in ``Example.prompt_fields``).
TASK_FIELDS: dict[str, dict[str, str]] = {
    "qa": {
        "knowledge": "knowledge",
        "question": "question",
        "reference": "right_answer",
        "hallucinated": "hallucinated_answer",
    },
    "dialogue": {
        "knowledge": "knowledge",
        "dialogue_history": "dialogue_history",
        "reference": "right_response",
        "hallucinated": "hallucinated_response",
    },
    "summarization": {
        "document": "document",
        "reference": "right_summary",
        "hallucinated": "hallucinated_summary",
    },
    "general": {
        # uid from the record index, not "ID": line 1975 of the official file has an empty ID.
        "user_query": "user_query",
        "response": "chatgpt_response",
        # The file uses "hallucination" although the HaluEval README says "hallucination_label".
        "label": "hallucination",
    },
    "selfaware": {
        "uid": "question_id",
        "question": "question",
        "answers": "answer",
        "label": "answerable",
    },
}
"""Default field mapping (role -> source field) per known task."""

_SPECIAL_ROLES = ("uid", "reference", "hallucinated", "response", "label", "answers")
_OPTIONAL_SOURCE_FIELDS = {("selfaware", "answers")}  # SelfAware "answer" is null when unanswerable
_KEEP_EXTRA = {"general": ("ID", "hallucination_spans"), "selfaware": ("source",)}
# SelfAware: answerable -> 0, unanswerable -> 1 (higher detector score = should abstain).
_LABEL_MAPS: dict[str, Mapping[Any, int]] = {"selfaware": {True: 0, False: 1}}

OnError = Literal["raise", "skip"]


@dataclass
class Example:
    """One source record, the unit of splitting.

    Attributes:
        uid: Stable id of the source record (e.g. ``"halueval_qa:17"``); both answers of a
            HaluEval pair share it, so splits grouped by ``uid`` never separate a pair.
        task: Task name (``"qa"``, ``"dialogue"``, ``"summarization"``, ``"general"``,
            ``"selfaware"`` or a user-defined name).
        prompt_fields: The fields a prompt template formats, e.g. ``{"knowledge", "question"}``.
        reference: The right answer / response / summary, or ``None`` when the set has none.
        hallucinated: The hallucinated answer of a HaluEval pair, or ``None``.
        label: Natural label when the set provides one (HaluEval general: 1 = the response is
            hallucinated; SelfAware: 1 = the question is unanswerable), else ``None``.
        response: A given response to be judged by ``label`` (HaluEval general's
            ``chatgpt_response``), else ``None``.
        meta: Everything else worth keeping (``answers`` list, ``source``, spans, line number).
    """

    uid: str
    task: str
    prompt_fields: dict[str, str]
    reference: str | None = None
    hallucinated: str | None = None
    label: int | None = None
    response: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The text a judge sees as the question (question, dialogue, query or document)."""
        for key in ("question", "user_query", "dialogue_history", "document"):
            if key in self.prompt_fields:
                return self.prompt_fields[key]
        return next(iter(self.prompt_fields.values()), "")

    @property
    def knowledge(self) -> str | None:
        """The grounding knowledge, if the task has one."""
        return self.prompt_fields.get("knowledge")

    @property
    def references(self) -> list[str]:
        """All acceptable right answers (SelfAware lists several; HaluEval has one)."""
        answers = self.meta.get("answers")
        if answers:
            return [str(a) for a in answers]
        return [self.reference] if self.reference is not None else []

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the record."""
        return asdict(self)


class RecordList(list):  # type: ignore[type-arg]
    """A list of :class:`Example` that also says where it came from and what was skipped.

    Attributes:
        source: The file path or Hub id the records were read from.
        n_skipped: How many bad lines were skipped (only non-zero with ``on_error="skip"``).
        skipped: ``(line, reason)`` for each skipped line.
    """

    def __init__(self, items: Iterable[Example] = (), source: str = "", skipped: list[tuple[int, str]] | None = None):
        super().__init__(items)
        self.source = source
        self.skipped: list[tuple[int, str]] = list(skipped or [])

    @property
    def n_skipped(self) -> int:
        """Number of skipped bad lines."""
        return len(self.skipped)

    @property
    def uids(self) -> list[str]:
        """The records' uids, in order."""
        return [r.uid for r in self]


# ---------------------------------------------------------------------------------------------
# Data directory
# ---------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the directory that holds ``halueval/`` and ``selfaware/``.

    Order: the ``data_dir`` argument, the ``HF_FLOWCHECK_DATA`` environment variable, then
    ``<repo>/../shared/data`` found relative to the installed package.

    Args:
        data_dir: Explicit directory; wins over everything else.

    Returns:
        The existing data directory.

    Raises:
        FileNotFoundError: No directory found; the message names the environment variable.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory.")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={env!r} is not a directory. Point it at the folder that holds "
                "'halueval/' and 'selfaware/'."
            )
        return path
    repo = Path(__file__).resolve().parents[2]
    candidate = repo.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    raise FileNotFoundError(
        f"Could not find the data directory (looked for {candidate}). Set the environment variable "
        f"{DATA_DIR_ENV} to the folder that holds 'halueval/' and 'selfaware/', pass data_dir=..., "
        "or load from the Hub with load_hub()."
    )


# ---------------------------------------------------------------------------------------------
# Record building
# ---------------------------------------------------------------------------------------------


def parse_label(value: Any, label_map: Mapping[Any, int] | None = None) -> int:
    """Turn a label value into 0/1.

    Accepts ``0``/``1``, booleans (``True`` -> 1), and the strings ``"0"``, ``"1"``, ``"yes"``,
    ``"no"``, ``"true"``, ``"false"`` (case-insensitive). ``label_map`` is applied first.

    Raises:
        ValueError: The value is not a 0/1 label.
    """
    if label_map is not None and not isinstance(value, (list, dict)) and value in label_map:
        out = label_map[value]
    elif isinstance(value, bool):
        out = int(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = int(value) if float(value) in (0.0, 1.0) else -1
    elif isinstance(value, str):
        out = {"0": 0, "1": 1, "yes": 1, "no": 0, "true": 1, "false": 0}.get(value.strip().lower(), -1)
    else:
        out = -1
    if out not in (0, 1):
        raise ValueError(
            f"label {value!r} is outside {{0, 1}}; use 0/1, true/false or yes/no "
            "(1 = hallucinated), or pass label_map= to translate your values."
        )
    return int(out)


def _build_example(
    obj: Any,
    *,
    task: str,
    fields: Mapping[str, str],
    index: int,
    uid_prefix: str,
    path: str,
    line: int,
    label_map: Mapping[Any, int] | None,
) -> Example:
    """Build one :class:`Example` from a decoded JSON object; raise :class:`DataFormatError`."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}.", path, line)
    values: dict[str, Any] = {}
    for role, src in fields.items():
        if src not in obj:
            if (task, role) in _OPTIONAL_SOURCE_FIELDS:
                values[role] = None
                continue
            present = ", ".join(sorted(map(str, obj))) or "none"
            raise DataFormatError(
                f"missing field {src!r} (role {role!r}); fields present: {present}. Fix the line, "
                "map the role to another field with fields={...}, or pass on_error='skip'.",
                path,
                line,
                src,
            )
        values[role] = obj[src]
    prompt_fields: dict[str, str] = {}
    for role, val in values.items():
        if role in _SPECIAL_ROLES:
            continue
        if not isinstance(val, str):
            raise DataFormatError(
                f"field {fields[role]!r} must be a string, got {type(val).__name__}.", path, line, fields[role]
            )
        prompt_fields[role] = val
    text: dict[str, str | None] = {}
    for role in ("reference", "hallucinated", "response"):
        val = values.get(role)
        if val is not None and not isinstance(val, str):
            raise DataFormatError(
                f"field {fields[role]!r} must be a string, got {type(val).__name__}.", path, line, fields[role]
            )
        text[role] = val
    label: int | None = None
    if "label" in values:
        try:
            label = parse_label(values["label"], label_map)
        except ValueError as err:
            raise DataFormatError(str(err), path, line, fields["label"]) from None
    meta: dict[str, Any] = {"line": line}
    answers = values.get("answers")
    if answers is not None:
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(
                f"field {fields['answers']!r} must be a string or a list of strings.", path, line, fields["answers"]
            )
        meta["answers"] = list(answers)
        if text["reference"] is None and answers:
            text["reference"] = answers[0]
    for key in _KEEP_EXTRA.get(task, ()):
        if key in obj:
            meta[key] = obj[key]
    if "uid" in values:
        raw = values["uid"]
        if raw is None or isinstance(raw, (dict, list)) or str(raw).strip() == "":
            raise DataFormatError(f"field {fields['uid']!r} must be a non-empty id.", path, line, fields["uid"])
        uid = f"{uid_prefix}:{raw}"
    else:
        uid = f"{uid_prefix}:{index}"
    return Example(
        uid=uid,
        task=task,
        prompt_fields=prompt_fields,
        reference=text["reference"],
        hallucinated=text["hallucinated"],
        label=label,
        response=text["response"],
        meta=meta,
    )


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'skip'.")


def _fields_for(task: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    if fields is not None:
        if not fields:
            raise ValueError("fields= is empty; map at least one prompt field, e.g. {'question': 'q'}.")
        return dict(fields)
    if task not in TASK_FIELDS:
        raise ValueError(
            f"task {task!r} has no default field mapping; pass fields={{role: source_field}} "
            f"(known tasks: {', '.join(TASK_FIELDS)})."
        )
    return dict(TASK_FIELDS[task])


def _collect(
    items: Iterator[tuple[int, Any]],
    *,
    task: str,
    fields: Mapping[str, str],
    uid_prefix: str,
    path: str,
    limit: int | None,
    on_error: str,
    label_map: Mapping[Any, int] | None,
) -> RecordList:
    """Build records from ``(line, decoded_object_or_exception)`` pairs."""
    _check_on_error(on_error)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be a positive integer or None.")
    out = RecordList(source=path)
    seen: set[str] = set()
    index = -1
    for line, obj in items:
        index += 1
        try:
            if isinstance(obj, Exception):
                raise DataFormatError(
                    f"{obj if isinstance(obj, UnicodeError) else f'not valid JSON ({obj})'}. Fix the line or pass "
                    "on_error='skip' to skip bad lines.",
                    path,
                    line,
                )
            ex = _build_example(
                obj,
                task=task,
                fields=fields,
                index=index,
                uid_prefix=uid_prefix,
                path=path,
                line=line,
                label_map=label_map,
            )
            if ex.uid in seen:
                raise DataFormatError(f"duplicate uid {ex.uid!r}.", path, line, fields.get("uid"))
        except DataFormatError as err:
            if on_error == "raise":
                raise
            out.skipped.append((line, str(err)))
            continue
        seen.add(ex.uid)
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        extra = f" ({out.n_skipped} bad lines skipped)" if out.n_skipped else ""
        raise ValueError(f"No records loaded from {path}{extra}; check the file and the field mapping.")
    return out


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(1-based line number, object, or the JSONDecodeError/UnicodeError of a bad line)``; skips blank lines.

    Text mode with universal newlines, so CRLF files (HaluEval general) read like LF files.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                bad = raw[err.start : err.start + 1].hex()
                yield lineno, UnicodeError(f"not UTF-8 text (byte 0x{bad} at column {err.start + 1}; re-save as UTF-8)")
                continue
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, err


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    task: str = "qa",
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
    label_map: Mapping[Any, int] | None = None,
    uid_prefix: str | None = None,
) -> RecordList:
    """Load records from any local JSON Lines file.

    Args:
        path: The ``.jsonl`` file (one JSON object per line; LF or CRLF).
        task: Task name; selects the default field mapping and the prompt template.
        fields: Mapping role -> source field. Roles ``uid``, ``reference``, ``hallucinated``,
            ``response``, ``label`` and ``answers`` are special; every other role becomes a prompt
            field, e.g. ``{"question": "q", "knowledge": "ctx", "reference": "gold"}``.
            Defaults to :data:`TASK_FIELDS` ``[task]``.
        limit: Stop after this many good records (reads only as many lines as needed).
        on_error: ``"raise"`` (default) raises :class:`DataFormatError` naming the file, the line
            and the field; ``"skip"`` skips bad lines and records them in ``.skipped``.
        label_map: Optional translation of label values to 0/1 (1 = hallucinated).
        uid_prefix: Prefix of generated uids (default: the file stem). Without a ``uid`` role,
            uids are ``"<prefix>:<0-based record index>"``.

    Returns:
        The records, with ``.n_skipped`` and ``.skipped``.

    Raises:
        FileNotFoundError: The file does not exist.
        DataFormatError: A bad line in ``"raise"`` mode.
        ValueError: No record could be loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    return _collect(
        _iter_jsonl(path),
        task=task,
        fields=_fields_for(task, fields),
        uid_prefix=uid_prefix or path.stem,
        path=str(path),
        limit=limit,
        on_error=on_error,
        label_map=label_map if label_map is not None else _LABEL_MAPS.get(task),
    )


def load_halueval(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> RecordList:
    """Load one HaluEval task from the local data directory.

    uids are ``"halueval_<task>:<0-based record index>"`` for every task (general included: its
    ``ID`` field is kept in ``meta`` but is empty on line 1975), identical to :func:`load_hub` on
    ``pminervini/HaluEval``.

    Args:
        task: ``"qa"``, ``"dialogue"``, ``"summarization"`` or ``"general"``.
        data_dir: Data directory; see :func:`resolve_data_dir`.
        limit: Load only the first ``limit`` records.
        on_error: ``"raise"`` or ``"skip"`` (see :func:`load_jsonl`).

    Returns:
        The records.
    """
    if task not in HALUEVAL_FILES:
        raise ValueError(f"Unknown HaluEval task {task!r}; choose one of {', '.join(HALUEVAL_FILES)}.")
    path = resolve_data_dir(data_dir) / HALUEVAL_FILES[task]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. Check {DATA_DIR_ENV} / data_dir, or use load_hub({task!r}) when online."
        )
    return load_jsonl(path, task=task, limit=limit, on_error=on_error, uid_prefix=f"halueval_{task}")


def load_halueval_qa(data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> RecordList:
    """Load HaluEval QA (knowledge, question, right/hallucinated answer). See :func:`load_halueval`."""
    return load_halueval("qa", data_dir, **kwargs)


def load_halueval_dialogue(data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> RecordList:
    """Load HaluEval dialogue. See :func:`load_halueval`."""
    return load_halueval("dialogue", data_dir, **kwargs)


def load_halueval_summarization(data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> RecordList:
    """Load HaluEval summarization (long documents: use ``limit=`` and truncate in the prompt)."""
    return load_halueval("summarization", data_dir, **kwargs)


def load_halueval_general(data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> RecordList:
    """Load HaluEval general: ``response`` = ``chatgpt_response``, ``label`` = human yes(1)/no(0).

    The file has CRLF line endings and its label field is ``hallucination`` (not
    ``hallucination_label`` as the HaluEval README says); both are handled. One record (line
    1975) has an empty ``ID``, so uids use the record index; ``meta["ID"]`` keeps the original.
    """
    return load_halueval("general", data_dir, **kwargs)


def load_selfaware(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> RecordList:
    """Load SelfAware: ``label`` 1 = unanswerable (the model should abstain), 0 = answerable.

    ``SelfAware.json`` is one JSON object whose ``example`` list holds the questions; errors
    name the 1-based record number within that list as the "line".

    Args:
        data_dir: Data directory; see :func:`resolve_data_dir`.
        path: Explicit path to ``SelfAware.json`` (overrides ``data_dir``).
        limit: Load only the first ``limit`` records.
        on_error: ``"raise"`` or ``"skip"``.

    Returns:
        The records; ``reference`` is the first listed answer and ``meta["answers"]`` all of them.
    """
    file = Path(path) if path is not None else resolve_data_dir(data_dir) / SELFAWARE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found. Check {DATA_DIR_ENV} / data_dir or pass path=.")
    with open(file, encoding="utf-8") as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"not valid JSON ({err.msg}).", file, err.lineno) from None
        except UnicodeDecodeError as err:
            raise DataFormatError(
                f"not UTF-8 text (byte offset {err.start}); re-save the file as UTF-8.", file, 1
            ) from None
    records = doc.get("example") if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise DataFormatError("expected an object with an 'example' list (or a list of records).", file, 1, "example")
    return _collect(
        ((i + 1, obj) for i, obj in enumerate(records)),
        task="selfaware",
        fields=TASK_FIELDS["selfaware"],
        uid_prefix="selfaware",
        path=str(file),
        limit=limit,
        on_error=on_error,
        label_map=_LABEL_MAPS["selfaware"],
    )


def load_hub(
    task: str = "qa",
    *,
    repo_id: str | None = None,
    config: str | None = None,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
    revision: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
    label_map: Mapping[Any, int] | None = None,
    uid_prefix: str | None = None,
    load_dataset: Callable[..., Any] | None = None,
) -> RecordList:
    """Load a dataset from the Hugging Face Hub (needs ``pip install datasets`` and network).

    Defaults to the mirror of the official files: ``pminervini/HaluEval``, config = task name,
    split ``"data"`` (same rows, same order, so uids match :func:`load_halueval`).

    Args:
        task: Task name (selects defaults for ``repo_id``/``config``/``split``/``fields``).
        repo_id: Hub dataset id; required for tasks without a default (e.g. ``"selfaware"``).
        config: Dataset config name.
        split: Split name.
        fields: Role -> column mapping (see :func:`load_jsonl`).
        revision: Git revision to pin.
        limit: Load only the first ``limit`` rows.
        on_error: ``"raise"`` or ``"skip"``.
        label_map: Optional label translation.
        uid_prefix: uid prefix (default ``"halueval_<task>"`` for HaluEval, else the repo name).
        load_dataset: Injected loader (for tests); defaults to ``datasets.load_dataset``.

    Returns:
        The records.
    """
    default = HUB_DATASETS.get(task)
    if repo_id is None:
        if default is None:
            raise ValueError(f"task {task!r} has no default Hub dataset; pass repo_id= (and split=, fields=).")
        repo_id = default[0]
    if default is not None and repo_id == default[0]:
        config = config if config is not None else default[1]
        split = split if split is not None else default[2]
        uid_prefix = uid_prefix or f"halueval_{task}"
    split = split or "train"
    if load_dataset is None:
        try:
            from datasets import load_dataset as _hf_load_dataset
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Loading from the Hub needs the 'datasets' package: pip install datasets "
                "(or use load_halueval()/load_jsonl() on local files)."
            ) from err
        load_dataset = _hf_load_dataset
    ds = load_dataset(repo_id, config, split=split, revision=revision)
    name = f"hf://datasets/{repo_id}" + (f"/{config}" if config else "") + f"[{split}]"
    rows = ((i + 1, dict(row)) for i, row in enumerate(ds))
    return _collect(
        rows,
        task=task,
        fields=_fields_for(task, fields),
        uid_prefix=uid_prefix or repo_id.split("/")[-1],
        path=name,
        limit=limit,
        on_error=on_error,
        label_map=label_map if label_map is not None else _LABEL_MAPS.get(task),
    )


#: Names :func:`load_by_name` knows (a path to a JSON Lines file works as well).
DATASET_NAMES = ("halueval-qa", "halueval-dialogue", "halueval-summarization", "halueval-general", "selfaware")


def load_by_name(name: str, data_dir: str | None = None, *, task: str = "qa", limit: int | None = None) -> Any:
    """Records of a dataset by name (one of :data:`DATASET_NAMES`) or of a JSON Lines file path.

    Args:
        name: ``"halueval-<task>"``, ``"selfaware"``, or a path to a JSON Lines file.
        data_dir: Data directory (default: ``$HF_FLOWCHECK_DATA`` or bundled).
        task: Task of a JSON Lines file (selects its fields).
        limit: Only the first ``limit`` records.

    Raises:
        ValueError: An unknown name that is not an existing file either.
    """
    if name.startswith("halueval-") and name in DATASET_NAMES:
        return load_halueval(name[len("halueval-") :], data_dir, limit=limit)
    if name == "selfaware":
        return load_selfaware(data_dir, limit=limit)
    if name and Path(name).is_file():
        return load_jsonl(name, task=task, limit=limit)
    raise ValueError(f"dataset {name!r} is neither one of {', '.join(DATASET_NAMES)} nor an existing JSON Lines file.")
