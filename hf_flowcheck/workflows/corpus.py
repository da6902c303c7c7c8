"""Generate the robustness corpus: the model's own answers in every task, prompt style and answer end.

One resumable answers file per (task, prompt style) cell under ``<out>/<task>/<style>.jsonl`` (the
format of :mod:`hf_flowcheck.workflows.answers`, every line carrying its task and style). Each record
is generated once, without a stopping criterion of ours (chat: to the model's end of turn; plain:
past the answer line), so the newline and cut ends are exact prefixes of it
(:class:`hf_flowcheck.data.corpus.AnswerEnd`).
Generation goes in rounds: each round adds up to ``per_round`` answers to every cell, so a run
stopped at any time leaves a balanced corpus, and the next run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_flowcheck.data.corpus import (
    CORPUS_TASKS,
    CUT_TOKENS,
    GENERATION_CAPS,
    assign_cells,
    check_task,
    corpus_prompt,
    judge_answer,
    load_task_records,
    postprocess_for,
)
from hf_flowcheck.model_io import eos_token_ids
from hf_flowcheck.tokens import token_table
from hf_flowcheck.workflows.answers import AnswerDecoding, AnswerFile, AnswerRecord, generate_answers, read_answers

__all__ = ["answer_view", "cell_path", "generate_corpus", "read_corpus"]


def cell_path(out_dir: str | os.PathLike[str], task: str, style: str) -> Path:
    """Where the answers of one (task, style) cell live."""
    return Path(out_dir) / task / f"{style}.jsonl"


def generate_corpus(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    fingerprint: dict[str, Any],
    tasks: Sequence[str] = tuple(CORPUS_TASKS),
    per_cell: int = 100,
    per_round: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    data_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[tuple[str, str], int]:
    """Answer up to ``per_cell`` records in every cell of ``tasks``, ``per_round`` per cell per round.

    Args:
        model: A transformers causal LM with a chat template on its tokenizer.
        tokenizer: Its tokenizer.
        out_dir: The corpus folder (created; resumed when it exists).
        fingerprint: The model's fingerprint (recorded in each file's header).
        tasks: Task names (:data:`hf_flowcheck.data.corpus.CORPUS_TASKS`).
        per_cell: Answers per cell to reach.
        per_round: Answers added to each cell per round.
        batch_size: Prompts per ``generate`` call.
        seed: Record permutation seed.
        data_dir: The data directory.
        log: Progress sink.

    Returns:
        ``(task, style) -> answers in the cell`` after the run.

    Raises:
        ValueError: An unknown task, or non-positive sizes.
    """
    for name, value in (("per_cell", per_cell), ("per_round", per_round), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    for t in tasks:
        check_task(t)
    eos = sorted(eos_token_ids(model, tokenizer))
    plan = {t: assign_cells(load_task_records(t, data_dir, seed=seed)) for t in tasks}
    counts: dict[tuple[str, str], int] = {}
    t0 = time.perf_counter()
    for reach in range(per_round, per_cell + per_round, per_round):
        reach = min(reach, per_cell)
        for task, by_style in plan.items():
            for style, records in by_style.items():
                family = "chat" if style.startswith("chat") else "plain"
                answered = generate_answers(
                    model,
                    tokenizer,
                    records[:reach],
                    cell_path(out_dir, task, style),
                    prompt_fn=lambda ex, style=style: corpus_prompt(ex, style, tokenizer),
                    judge=judge_answer,
                    dataset={"name": task, "style": style, "order": "permutation", "seed": seed, "corpus": 1},
                    fingerprint=fingerprint,
                    decoding=AnswerDecoding(
                        max_new_tokens=GENERATION_CAPS[family],
                        batch_size=batch_size,
                        generate_kwargs={"eos_token_id": eos},
                        description={"stop": "none", "padding": "left"},
                    ),
                    postprocess=postprocess_for(style),
                    log=None,
                    record_fields={"task": task, "style": style},
                )
                counts[(task, style)] = len(answered.records)
        if log is not None:
            log(f"round to {reach}/cell: {sum(counts.values())} answers, {time.perf_counter() - t0:.0f} s")
    return counts


def read_corpus(out_dir: str | os.PathLike[str], tasks: Sequence[str] | None = None) -> list[AnswerFile]:
    """Every cell file under ``out_dir`` (optionally only ``tasks``), sorted by path."""
    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} does not exist; create it with `flowcheck corpus`.")
    names = tasks if tasks is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    for t in names:
        check_task(t)
    return [read_answers(p) for t in names for p in sorted((root / t).glob("*.jsonl"))]


def answer_view(record: AnswerRecord, end: str, tokenizer: Any) -> AnswerRecord | None:
    """``record`` as it would have ended with answer end ``end``; ``None`` where that end did not occur.

    Greedy decoding is deterministic, so each end is a prefix of the one stored generation:

    * ``"eos"``: the whole generation, when the model ended it (``stop == "eos"``);
    * ``"newline"``: up to and including the first token holding a newline after text;
    * ``"cut"``: the first :data:`~hf_flowcheck.data.corpus.CUT_TOKENS` tokens, when there were more;
    * ``"primary"``: what the corpus trains on: chat answers whole, plain ones up to their newline
      (or their judged tokens when there is none).

    The label is the record's: a cut answer is labelled by what the model was answering.
    """
    gen = list(record.gen_ids)
    if end == "eos":
        keep = len(gen) if record.stop == "eos" else None
    elif end == "newline":
        keep = _first_line_end(gen, tokenizer)
    elif end == "cut":
        keep = CUT_TOKENS if len(gen) > CUT_TOKENS else None
    elif end == "primary":
        if (record.style or "chat").startswith("chat"):
            keep = len(gen)
        else:
            keep = _first_line_end(gen, tokenizer) or record.answer_len
    else:
        raise ValueError(f"end={end!r} is not supported; use 'eos', 'newline', 'cut' or 'primary'.")
    if not keep:
        return None
    return dataclasses.replace(record, gen_ids=gen[:keep], answer_len=min(record.answer_len, keep), end=end)


def _first_line_end(gen: list[int], tokenizer: Any) -> int | None:
    """Tokens up to and including the first newline that follows text (what AnswerLineStop stops at)."""
    table = token_table(tokenizer)
    size = table.blank.shape[0]
    seen_text = False
    for i, tok in enumerate(gen):
        inside = tok < size
        if inside and bool(table.has_newline[tok]) and (seen_text or bool(table.text_before_newline[tok])):
            return i + 1
        if not inside or not bool(table.blank[tok]):
            seen_text = True
    return None
