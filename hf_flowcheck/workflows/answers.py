"""The model's own answers, generated once and kept as a small committed JSON Lines file.

Generation is the expensive, deterministic half of the generated protocol; feature extraction is
cheap to redo and changes with every feature variant. So the answers (prompt, generated token ids,
decoded answer, judge label), the decoding settings and the model's fingerprint go into an
append-only JSONL that a later run re-extracts teacher-forced (capture during ``generate`` equals
the teacher-forced replay, a tested invariant).

File layout: the first line is a header ``{"kind": "header", ...}`` (format, version, model
fingerprint, dataset, decoding); every other line is ``{"kind": "answer", ...}``. Each batch is
appended and ``fsync``-ed, so a killed run loses at most the batch in flight; a torn last line is
cut on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_flowcheck.configuration import check_positive_int, parse_positive_int
from hf_flowcheck.data import QA_SHOT_UIDS, Example, clean_generation
from hf_flowcheck.data.judges import judge_record
from hf_flowcheck.errors import AnswerFileError
from hf_flowcheck.filelocks import exclusive_writer
from hf_flowcheck.tokens import answer_token_count
from hf_flowcheck.version import __version__

__all__ = [
    "ANSWERS_FORMAT",
    "ANSWERS_FORMAT_VERSION",
    "AnswerDecoding",
    "AnswerFile",
    "AnswerFileError",
    "AnswerRecord",
    "generate_answers",
    "read_answers",
]

ANSWERS_FORMAT = "hf_flowcheck.answers"
ANSWERS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class AnswerRecord:
    """One generated answer.

    Attributes:
        uid: Source record id.
        prompt: The exact prompt text the model answered.
        gen_ids: The generated token ids up to (not including) the first EOS.
        answer_len: How many of ``gen_ids`` decode to the judged ``answer`` (the answer tokens).
        raw: ``gen_ids`` decoded.
        answer: The judged answer (``raw`` post-processed: first non-empty line).
        label: 0 correct, 1 hallucinated, ``None`` dropped/failed by the judge.
        judge_reason: The judge's explanation.
        references: The reference answer(s) the judge compared against.
        task: The corpus task (``None`` in files written before the corpus).
        style: The prompt style (``None`` in older files).
        end: The answer end the decoding allowed (``"eos"``, ``"newline"``, ``"cut"``; ``None`` in older files).
        stop: What ended this answer: ``"eos"``, ``"stop"`` (a stopping criterion) or ``"max_new_tokens"``.
    """

    uid: str
    prompt: str
    gen_ids: list[int]
    answer_len: int
    raw: str
    answer: str
    label: int | None
    judge_reason: str
    references: list[str] = field(default_factory=list)
    task: str | None = None
    style: str | None = None
    end: str | None = None
    stop: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": "answer", **self.__dict__}


@dataclass
class AnswerFile:
    """A parsed answers file: its header and its records in file order."""

    path: Path
    header: dict[str, Any]
    records: list[AnswerRecord]

    @property
    def labelled(self) -> list[AnswerRecord]:
        return [r for r in self.records if r.label is not None]

    def counts(self) -> dict[str, int]:
        labels = [r.label for r in self.records]
        return {
            "answers": len(labels),
            "label_0": labels.count(0),
            "label_1": labels.count(1),
            "unlabelled": labels.count(None),
            "empty": sum(1 for r in self.records if not r.answer),
        }


def _check_header(path: Path, line_no: int, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("kind") != "header" or obj.get("format") != ANSWERS_FORMAT:
        raise AnswerFileError(
            f"{path}:{line_no}: the first line is not an hf_flowcheck answers header; this file was not written "
            "by generate_answers (pass another --out)."
        )
    if obj.get("format_version") != ANSWERS_FORMAT_VERSION:
        raise AnswerFileError(
            f"{path}: format_version {obj.get('format_version')!r} is not {ANSWERS_FORMAT_VERSION}; "
            "regenerate it with this version of hf_flowcheck."
        )
    return obj


def _parse(path: Path, *, allow_torn_tail: bool, keep_first: bool = False) -> tuple[AnswerFile, int]:
    """The file and the byte length of its complete lines (a torn last line is excluded).

    ``keep_first``: a uid that appears again is skipped (its first record kept) instead of refused.
    """
    data = path.read_bytes()
    good_len = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
    if good_len != len(data) and not allow_torn_tail:
        raise AnswerFileError(f"{path}: the last line is incomplete (a run was killed while writing); resume it.")
    header: dict[str, Any] | None = None
    records: list[AnswerRecord] = []
    seen: set[str] = set()
    for line_no, raw in enumerate(data[:good_len].splitlines(), start=1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AnswerFileError(f"{path}:{line_no}: not a JSON line ({err}).") from err
        if header is None:
            header = _check_header(path, line_no, obj)
            continue
        if not isinstance(obj, dict) or obj.get("kind") != "answer":
            raise AnswerFileError(f"{path}:{line_no}: expected an answer line, got {raw[:80]!s}.")
        obj = {k: v for k, v in obj.items() if k != "kind"}
        try:
            rec = AnswerRecord(**obj)
        except TypeError as err:
            raise AnswerFileError(f"{path}:{line_no}: malformed answer line ({err}).") from err
        problem = _bad_field(rec)
        if problem:
            raise AnswerFileError(f"{path}:{line_no}: {problem}; fix or delete that line.")
        if rec.uid in seen:
            if keep_first:
                continue
            raise AnswerFileError(
                f"{path}:{line_no}: uid {rec.uid!r} appears twice (two runs appended to one file); resume the run "
                "(`flowcheck answers`/`flowcheck corpus` with the same --out) to keep the first of each."
            )
        seen.add(rec.uid)
        records.append(rec)
    if header is None:
        raise AnswerFileError(f"{path}: empty file; delete it or pass another --out.")
    return AnswerFile(path, header, records), good_len


def _bad_field(rec: AnswerRecord) -> str | None:
    """What is wrong with a parsed record's field types, or ``None``."""
    if not isinstance(rec.uid, str) or not rec.uid:
        return f"uid {rec.uid!r} is not a non-empty string"
    if not isinstance(rec.gen_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in rec.gen_ids):  # fmt: skip
        return f"gen_ids of {rec.uid!r} must be a list of non-negative integer token ids"
    if (
        isinstance(rec.answer_len, bool)
        or not isinstance(rec.answer_len, int)
        or not 0 <= rec.answer_len <= len(rec.gen_ids)
    ):
        return f"answer_len={rec.answer_len!r} of {rec.uid!r} must be an integer in [0, {len(rec.gen_ids)}]"
    if rec.label not in (0, 1, None) or isinstance(rec.label, bool):
        return f"label={rec.label!r} of {rec.uid!r} must be 0, 1 or null"
    for name in ("prompt", "raw", "answer", "judge_reason"):
        if not isinstance(getattr(rec, name), str):
            return f"{name} of {rec.uid!r} must be a string"
    return None


def _rewrite_keeping_first(path: Path, good_len: int) -> None:
    """Rewrite ``path`` atomically with the first record of each uid (a torn last line dropped)."""
    data = path.read_bytes()[:good_len].splitlines(keepends=True)
    seen: set[str] = set()
    kept = [data[0]]
    for raw in data[1:]:
        uid = json.loads(raw.decode("utf-8")).get("uid")
        if uid not in seen:
            seen.add(uid)
            kept.append(raw)
    tmp = path.with_name(f".{path.name}.repair-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(b"".join(kept))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_answers(path: str | os.PathLike[str]) -> AnswerFile:
    """Read an answers file written by :func:`generate_answers`.

    Raises:
        FileNotFoundError: No such file.
        AnswerFileError: Not an answers file, a malformed or duplicated line, a torn last line.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"answers file {p} does not exist; create it with `flowcheck answers`.")
    return _parse(p, allow_torn_tail=False)[0]


def _references(rec: Example) -> list[str]:
    return [str(r) for r in (rec.references or [])]


@dataclass(frozen=True)
class AnswerDecoding:
    """How :func:`generate_answers` decodes (greedy is the protocol; prompts left padded).

    Attributes:
        max_new_tokens: Answer length cap.
        batch_size: Prompts per ``generate`` call (longest first within chunks of 8 batches).
        generate_kwargs: Extra ``generate`` arguments (a stopping criterion, ``eos_token_id``); not
            recorded, so ``description`` must say what they do.
        description: What the header records beside ``do_sample`` and ``max_new_tokens`` (the stop rule,
            padding); a file is resumed only with an equal header.
    """

    max_new_tokens: int = field(
        default=32, metadata={"help": "Answer length cap in new tokens.", "parse": parse_positive_int}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call.", "parse": parse_positive_int})
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            check_positive_int(name, getattr(self, name), "AnswerDecoding")

    def header(self) -> dict[str, Any]:
        """The header's ``decoding`` entry."""
        return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **self.description}


def generate_answers(
    model: Any,
    tokenizer: Any,
    records: Sequence[Example],
    out_path: str | os.PathLike[str],
    *,
    prompt_fn: Callable[[Example], str],
    judge: Any,
    dataset: dict[str, Any],
    fingerprint: dict[str, Any],
    decoding: AnswerDecoding | None = None,
    postprocess: Callable[[str], str] = clean_generation,
    log: Callable[[str], None] | None = print,
    record_fields: dict[str, str] | None = None,
) -> AnswerFile:
    """Greedily answer ``records`` and append the answers to ``out_path`` batch by batch (resumable).

    Args:
        model: A transformers causal LM.
        tokenizer: Its tokenizer.
        records: Source records (few-shot demonstration records are skipped).
        out_path: The JSONL to create or resume.
        prompt_fn: ``record -> prompt``.
        judge: ``"record-label"``, a judge callable ``(question, answer, reference, knowledge)``, or a
            callable ``(record, answer)`` whose ``takes_example`` attribute is true (the corpus judge).
        dataset: What the records are (name, split, sample, prompt style), recorded in the header.
        fingerprint: The model's fingerprint (:func:`hf_flowcheck.fingerprint.model_fingerprint`).
        decoding: How to decode (:class:`AnswerDecoding`: length cap, batch size, extra ``generate``
            arguments, the description recorded in the header); its defaults when omitted.
        postprocess: Raw continuation -> judged answer.
        log: Progress sink (``None`` for silence).
        record_fields: ``task``/``style``/``end`` written on every answer line (the corpus).

    Returns:
        The whole file after this run.

    Raises:
        AnswerFileError: ``out_path`` was written for another model, dataset or decoding.
        WriterBusyError: Another process is writing ``out_path`` (its PID is named).
    """
    decoding = decoding if decoding is not None else AnswerDecoding()
    if not isinstance(decoding, AnswerDecoding):
        raise TypeError(f"decoding must be an AnswerDecoding, got {type(decoding).__name__}.")
    path = Path(out_path).expanduser()
    header = {
        "kind": "header",
        "format": ANSWERS_FORMAT,
        "format_version": ANSWERS_FORMAT_VERSION,
        "hf_flowcheck_version": __version__,
        "model": fingerprint,
        "dataset": dataset,
        "decoding": decoding.header(),
    }
    with exclusive_writer(path, "answers file"):
        return _generate_locked(
            model, tokenizer, records, path, header, prompt_fn, judge, decoding, postprocess, log, record_fields
        )


def _generate_locked(
    model: Any,
    tokenizer: Any,
    records: Sequence[Example],
    path: Path,
    header: dict[str, Any],
    prompt_fn: Callable[[Example], str],
    judge: Any,
    decoding: AnswerDecoding,
    postprocess: Callable[[str], str],
    log: Callable[[str], None] | None,
    record_fields: dict[str, str] | None,
) -> AnswerFile:
    from hf_flowcheck.stopping import bind_prompt_width

    batch_size, max_new_tokens, generate_kwargs = decoding.batch_size, decoding.max_new_tokens, decoding.generate_kwargs
    done: set[str] = set()
    if path.exists():
        existing, good_len = _parse(path, allow_torn_tail=True, keep_first=True)
        for key in ("model", "dataset", "decoding"):
            if existing.header.get(key) != header[key]:
                raise AnswerFileError(
                    f"{path} was written with another {key} ({existing.header.get(key)!r}, now {header[key]!r}); "
                    "pass another --out to start a new file."
                )
        n_lines = path.read_bytes()[:good_len].count(b"\n")
        if n_lines != len(existing.records) + 1:  # duplicates appended by a second writer: keep the first
            _rewrite_keeping_first(path, good_len)
        elif good_len != path.stat().st_size:
            with path.open("r+b") as fh:  # cut a line torn by a kill
                fh.truncate(good_len)
        done = {r.uid for r in existing.records}
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(header, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    todo = [r for r in records if r.uid not in QA_SHOT_UIDS and r.uid not in done]
    # Longest-first within chunks of 8 batches: less padding, and a prefix of the file stays a sample of the order.
    chunk = 8 * batch_size
    todo = [
        r
        for c in range(0, len(todo), chunk)
        for r in sorted(todo[c : c + chunk], key=lambda r: -len(tokenizer(prompt_fn(r))["input_ids"]))
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = (generate_kwargs or {}).get("eos_token_id", model.generation_config.eos_token_id)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    device = next(model.parameters()).device
    t_start = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = [prompt_fn(r) for r in batch]
        rows = [tokenizer(p)["input_ids"] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            att[i, width - len(row) :] = 1
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id, **(generate_kwargs or {})}
        kwargs.update(do_sample=False)
        with torch.inference_mode():
            seqs = model.generate(
                input_ids=ids.to(device), attention_mask=att.to(device), **bind_prompt_width(kwargs, width)
            )
        lines = []
        for i, rec in enumerate(batch):
            gen: list[int] = []
            stop = "stop"
            for tok in seqs[i, width:].tolist():
                if tok in eos_ids:
                    stop = "eos"
                    break
                gen.append(tok)
            if stop != "eos" and len(gen) >= max_new_tokens:
                stop = "max_new_tokens"
            raw = tokenizer.decode(gen, skip_special_tokens=True)
            answer = postprocess(raw)
            result = judge_record(judge, rec, answer)
            out = AnswerRecord(
                uid=rec.uid,
                prompt=prompts[i],
                gen_ids=gen,
                answer_len=answer_token_count(tokenizer, gen, answer, postprocess),
                raw=raw,
                answer=answer,
                label=result.label,
                judge_reason=result.reason,
                references=_references(rec),
                stop=stop,
                **(record_fields or {}),
            )
            lines.append(json.dumps(out.to_json(), ensure_ascii=False) + "\n")
        with path.open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        if log is not None:
            n = start + len(batch)
            rate = n / (time.perf_counter() - t_start)
            log(f"{len(done) + n} answers ({n}/{len(todo)} this run, {rate:.2f}/s)")
    return read_answers(path)


def records_digest(records: Iterable[Example]) -> str:
    """A short digest of the records' uids (recorded so that a resumed run answers the same set)."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.uid.encode() + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- CLI
ANSWER_DATASETS = ("halueval-qa", "halueval-qa-closed-book", "selfaware")


def closed_book(record: Example) -> Example:
    """A HaluEval-QA record asked without its knowledge paragraph (2-shot ``Question:/Answer:`` prompt).

    Zero-shot, SmolLM2-135M left 332 of 500 such answers empty; the two QA shots, without their
    knowledge, show it the answer format.
    """
    fields = {"question": record.prompt_fields["question"]}
    return Example(
        record.uid, "qa-closed-book", fields, reference=record.reference, label=record.label, meta=record.meta
    )


def load_answer_records(name: str, data_dir: str | None, *, seed: int, limit: int | None) -> tuple[list[Example], Any]:
    """Records of ``name`` in a seeded permutation (any prefix is a random sample) and their judge."""
    import numpy as np

    from hf_flowcheck import data

    if name not in ANSWER_DATASETS:
        raise ValueError(f"--dataset {name!r} is not supported; use one of {', '.join(ANSWER_DATASETS)}.")
    if name == "selfaware":
        from hf_flowcheck.data.corpus import EXCLUDED_SOURCES

        # SQuAD-sourced questions are reserved for evaluation outside the project.
        recs = [r for r in data.load_selfaware(data_dir) if not any(x in str(r.meta.get("source", "")).lower()
                                                                     for x in EXCLUDED_SOURCES)]  # fmt: skip
        judge = "record-label"
    else:
        recs, judge = list(data.load_halueval("qa", data_dir)), data.ReferenceF1Judge()
        if name.endswith("closed-book"):
            recs = [closed_book(r) for r in recs]
    order = np.random.default_rng(seed).permutation(len(recs)).tolist()
    return [recs[i] for i in order][:limit], judge
