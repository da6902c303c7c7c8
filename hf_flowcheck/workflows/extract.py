"""Extraction at scale: flow signatures of a whole dataset into resumable feature shards.

:func:`extract_dataset` runs a model over labelled examples (paired/teacher-forced) or over
records it answers itself (generated, labelled by a judge) and writes a
:class:`~hf_flowcheck.workflows.store.FeatureStore`. It resumes after a crash, refuses to mix features of
different setups in one directory, and splits the shards over the processes of an
``accelerate`` launch (shard ``i`` goes to process ``i % num_processes``).

The ``flowcheck extract`` command lives in :mod:`hf_flowcheck.cli.research`.

Example:
    >>> from hf_flowcheck import FlowConfig
    >>> from hf_flowcheck.data import load_halueval_qa, paired_examples
    >>> from hf_flowcheck.offline_models import load_model
    >>> model, tok = load_model()  # doctest: +SKIP
    >>> examples = paired_examples(load_halueval_qa(limit=8))  # doctest: +SKIP
    >>> store = extract_dataset(model, tok, examples, "feats/qa-paired", config=FlowConfig(),
    ...                         protocol="paired")  # doctest: +SKIP
    >>> feats, labels, uids = store.load()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.data import QA_SHOT_UIDS, Example, LabeledExample, as_judge, clean_generation
from hf_flowcheck.data import generation_prompt as _default_generation_prompt
from hf_flowcheck.data.judges import RECORD_LABEL, judge_record
from hf_flowcheck.detectors.base import encode_text, tokenize_prompt_answer
from hf_flowcheck.errors import ExtractionMismatchError
from hf_flowcheck.extraction import FlowExtractor, FlowFeatures
from hf_flowcheck.filelocks import exclusive_writer
from hf_flowcheck.generation import capture_generate
from hf_flowcheck.model_io import pad_token_id
from hf_flowcheck.stopping import AnswerLineStop, bind_prompt_width, supports_answer_line_stop
from hf_flowcheck.tokens import answer_token_count
from hf_flowcheck.version import __version__
from hf_flowcheck.workflows.extract_config import PROTOCOLS, ExtractConfig
from hf_flowcheck.workflows.store import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    FeatureStore,
    FeatureStoreError,
    ShardData,
    file_sha256,
    pad_features,
    read_manifest,
    read_shard_metadata,
    remove_stale_temp_files,
    shard_name,
    verify_shard,
    write_manifest,
    write_shard,
)

__all__ = [
    "PROTOCOLS",
    "RECORD_LABEL",
    "ExtractConfig",
    "ExtractionMismatchError",
    "extract_dataset",
    "newline_stop_kwargs",
]

#: Test hook: called as ``hook(shard_index)`` after each shard is written (simulates a crash).
_after_shard_hook: Callable[[int], None] | None = None


def _model_fingerprint(model: Any) -> dict[str, Any]:
    """The base model's fingerprint (``hf_flowcheck.fingerprint.model_fingerprint``), JSON-normalised."""
    try:
        from hf_flowcheck.fingerprint import model_fingerprint
    except ImportError as err:  # pragma: no cover - depends on the installed version
        raise ImportError(
            f"hf_flowcheck.fingerprint.model_fingerprint is unavailable ({err}); reinstall hf_flowcheck."
        ) from err
    return json.loads(json.dumps(model_fingerprint(model), sort_keys=True, default=str))


# ------------------------------------------------------------------------------ work items
@dataclass
class _Item:
    index: int
    uid: str
    prompt: str
    completion: str
    label: int | None
    source: str
    record: Example | None = None
    token_ids: tuple[list[int], list[int]] | None = None  # replayed: (prompt ids, answer ids)


def _items(
    examples: Sequence[Any], protocol: str, prompt_fn: Callable[[Example], str] | None
) -> tuple[list[_Item], int]:
    """Work items and the number of few-shot records excluded."""
    items: list[_Item] = []
    excluded = 0
    for i, ex in enumerate(examples):
        if protocol == "generated":
            if not isinstance(ex, Example):
                raise TypeError(
                    f"protocol='generated' needs source records (hf_flowcheck.data.Example, e.g. from "
                    f"load_halueval_qa()), got {type(ex).__name__} at position {i}. For prompt+answer pairs use "
                    "protocol='paired'."
                )
            if ex.uid in QA_SHOT_UIDS:
                excluded += 1
                continue
            prompt = prompt_fn(ex) if prompt_fn is not None else _default_generation_prompt(ex)
            items.append(_Item(i, ex.uid, prompt, "", None, "generated", ex))
        elif protocol == "replayed":
            if not hasattr(ex, "gen_ids") or not hasattr(ex, "answer_len"):
                raise TypeError(
                    f"protocol='replayed' needs AnswerRecord items (hf_flowcheck.workflows.answers.read_answers()), "
                    f"got {type(ex).__name__} at position {i}."
                )
            if ex.label is None:
                excluded += 1
                continue
            # Every generated token up to EOS (the stop's newline too): what generate(return_flow_scores=True) scores.
            answer_ids = list(ex.gen_ids)
            items.append(
                _Item(i, ex.uid, ex.prompt, ex.answer, int(ex.label), "replayed", token_ids=(None, answer_ids))
            )
        else:
            if not isinstance(ex, LabeledExample):
                raise TypeError(
                    f"protocol={protocol!r} needs LabeledExample items (paired_examples() / natural_examples()), "
                    f"got {type(ex).__name__} at position {i}. For records the model answers, use protocol='generated'."
                )
            if ex.label is None:
                raise ValueError(
                    f"example {i} ({ex.uid}) has label=None; teacher-forced extraction stores labelled examples only."
                )
            items.append(_Item(i, ex.uid, ex.prompt, ex.completion, int(ex.label), ex.source))
    return items, excluded


def _plan_key(items: Sequence[_Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        key = [it.index, it.uid, it.prompt, it.completion, it.label, it.source]
        if it.token_ids is not None:
            key.append(it.token_ids[1])
        h.update(json.dumps(key).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# -------------------------------------------------------------------------------- tokenizing
def _pad(rows: Sequence[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``[n, S]`` ids and attention mask; also each row's left padding."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, r in enumerate(rows):
        off = width - len(r) if left else 0
        ids[i, off : off + len(r)] = torch.tensor(r, dtype=torch.long)
        att[i, off : off + len(r)] = 1
        offsets.append(off)
    return ids, att, offsets


def _shift_positions(feats: FlowFeatures, offsets: Sequence[int], limits: Sequence[int] | None = None) -> FlowFeatures:
    """Positions relative to each unpadded row; drops columns at or past ``limits[i]`` (unpadded)."""
    pos = feats.positions.clone()
    off = torch.tensor(list(offsets), dtype=torch.long, device=pos.device).unsqueeze(-1)
    real = pos >= 0
    pos = torch.where(real, pos - off, pos)
    keep = real
    if limits is not None:
        lim = torch.tensor(list(limits), dtype=torch.long, device=pos.device).unsqueeze(-1)
        keep = real & (pos < lim)
    pos = torch.where(keep, pos, torch.full_like(pos, -1))
    valid = feats.valid & keep.unsqueeze(1)
    values = feats.values * valid.unsqueeze(-1).to(feats.values.dtype)
    t = int(keep.sum(-1).max()) if keep.numel() else 0
    return FlowFeatures(
        values[:, :, :t], valid[:, :, :t], pos[:, :t], feats.names, list(feats.sample_keys), states=feats.states
    )


# ------------------------------------------------------------------------------ per batch
def _run_replayed(
    ext: FlowExtractor, tokenizer: Any, batch: list[_Item], pad_id: int
) -> tuple[FlowFeatures, list[int]]:
    """Teacher-force each prompt followed by the exact answer tokens the model generated."""
    rows, starts = [], []
    for it in batch:
        p_ids = encode_text(tokenizer, it.prompt)
        rows.append(p_ids + list(it.token_ids[1]))
        starts.append(len(p_ids))
    return _teacher_forced(ext, rows, starts, pad_id)


def _teacher_forced(
    ext: FlowExtractor, rows: list[list[int]], starts: list[int], pad_id: int
) -> tuple[FlowFeatures, list[int]]:
    """Features of ``rows[i][starts[i]:]`` given the rest, positions relative to each unpadded row."""
    ids, att, offsets = _pad(rows, pad_id, left=False)
    resp = torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, starts)):
        resp[i, start : len(row)] = 1
    feats = ext.extract(ids, att, resp)
    return _shift_positions(feats.to("cpu"), offsets), starts


def _run_paired(ext: FlowExtractor, tokenizer: Any, batch: list[_Item], pad_id: int) -> tuple[FlowFeatures, list[int]]:
    rows, starts = [], []
    for it in batch:
        f_ids, start = tokenize_prompt_answer(tokenizer, it.prompt, it.completion)
        rows.append(f_ids)
        starts.append(start)
    return _teacher_forced(ext, rows, starts, pad_id)


def _run_generated(
    ext: FlowExtractor,
    tokenizer: Any,
    batch: list[_Item],
    pad_id: int,
    max_new_tokens: int,
    postprocess: Callable[[str], str] | None,
    generate_kwargs: dict[str, Any],
) -> tuple[FlowFeatures, list[int], list[str], list[str]]:
    """Features (truncated to the judged answer's tokens), prompt lengths, raw and cleaned answers."""
    rows = [encode_text(tokenizer, it.prompt) for it in batch]
    ids, att, offsets = _pad(rows, pad_id, left=True)
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id, **generate_kwargs}
    seqs, feats = capture_generate(ext, ids, att, **bind_prompt_width(kwargs, ids.shape[1]))
    seqs = seqs.to("cpu")
    width = ids.shape[1]
    raws, answers, limits = [], [], []
    for i, row in enumerate(rows):
        gen = []
        for tok in seqs[i, width:].tolist():
            if tok in ext.eos_ids:
                break
            gen.append(tok)
        raw = tokenizer.decode(gen, skip_special_tokens=True)
        answer = postprocess(raw) if postprocess is not None else raw
        k = answer_token_count(tokenizer, gen, answer, postprocess)
        raws.append(raw)
        answers.append(answer)
        limits.append(len(row) + k)
    return _shift_positions(feats.to("cpu"), offsets, limits), [len(r) for r in rows], raws, answers


def _empty_counts() -> dict[str, int]:
    return {"inputs": 0, "stored": 0, "label_0": 0, "label_1": 0, "dropped": 0, "failed": 0}


def _extract_shard(
    ext: FlowExtractor,
    tokenizer: Any,
    items: list[_Item],
    shard_index: int,
    plan_key: str,
    *,
    run: ExtractConfig,
    judge: Any,
    postprocess: Callable[[str], str] | None,
    generate_kwargs: dict[str, Any],
    pad_id: int,
    setup_key: str = "",
    on_batch: Callable[[int], None],
) -> ShardData:
    # Longest first within the shard: less padding; results go back to input order below.
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt) - len(items[i].completion))
    kept: list[tuple[int, FlowFeatures, int, int, dict[str, str]]] = []  # (pos, feats[1], label, prompt_len, meta)
    counts = _empty_counts()
    protocol = run.protocol
    for start in range(0, len(order), run.batch_size):
        idx = order[start : start + run.batch_size]
        batch = [items[i] for i in idx]
        if protocol == "generated":
            feats, p_lens, raws, answers = _run_generated(
                ext, tokenizer, batch, pad_id, run.max_new_tokens, postprocess, generate_kwargs
            )
            for j, (pos, it) in enumerate(zip(idx, batch)):
                counts["inputs"] += 1
                res = judge_record(judge, it.record, answers[j])
                if res.label is None:
                    counts["failed" if res.status == "failed" else "dropped"] += 1
                    continue
                meta = {"source": it.source, "answer": answers[j], "raw_answer": raws[j], "reason": res.reason}
                kept.append((pos, feats[j], int(res.label), p_lens[j], meta))
        else:
            teacher_force = _run_replayed if protocol == "replayed" else _run_paired
            feats, p_lens = teacher_force(ext, tokenizer, batch, pad_id)
            for j, (pos, it) in enumerate(zip(idx, batch)):
                counts["inputs"] += 1
                meta = {"source": it.source, "answer": it.completion.strip()}
                kept.append((pos, feats[j], int(it.label), p_lens[j], meta))
        on_batch(len(batch))
    kept.sort(key=lambda r: r[0])
    for _, _, label, _, _ in kept:
        counts["stored"] += 1
        counts[f"label_{label}"] += 1
    n_blocks, names = ext.arch.num_blocks, ext.config.feature_names
    if kept:
        feats = pad_features([r[1] for r in kept])
    else:
        feats = FlowFeatures(
            torch.zeros(0, n_blocks, 0, len(names)),
            torch.zeros(0, n_blocks, 0, dtype=torch.bool),
            torch.zeros(0, 0, dtype=torch.long),
            names,
            [],
        )
    meta_keys = list(kept[0][4]) if kept else (["source", "answer"] if protocol != "generated" else [])
    metadata: dict[str, Any] = {f"{k}s": [r[4][k] for r in kept] for k in meta_keys}
    metadata.update(
        {"shard": shard_index, "plan_key": plan_key, "setup_key": setup_key, "counts": counts, "protocol": protocol}
    )
    return ShardData(
        values=feats.values.float(),
        valid=feats.valid,
        positions=feats.positions,
        labels=torch.tensor([r[2] for r in kept], dtype=torch.long),
        index=torch.tensor([items[r[0]].index for r in kept], dtype=torch.long),
        sample_keys=torch.tensor([int(k) for k in feats.sample_keys], dtype=torch.long),
        prompt_lengths=torch.tensor([r[3] for r in kept], dtype=torch.long),
        uids=[items[r[0]].uid for r in kept],
        metadata=metadata,
        states=feats.states,
    )


# ---------------------------------------------------------------------------------- state
class _SingleProcess:
    num_processes = 1
    process_index = 0
    is_main_process = True

    def wait_for_everyone(self) -> None:
        return None


def _resolve_state(accelerator: Any) -> Any:
    if accelerator is not None:
        for attr in ("num_processes", "process_index", "is_main_process", "wait_for_everyone"):
            if not hasattr(accelerator, attr):
                raise TypeError(
                    f"accelerator must be an accelerate.Accelerator or PartialState (missing {attr!r}), "
                    f"got {type(accelerator).__name__}."
                )
        return accelerator
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate/torchrun: join the group
        from accelerate import PartialState

        xpu = getattr(torch, "xpu", None)
        has_accel = torch.cuda.is_available() or (xpu is not None and xpu.is_available())
        return PartialState(cpu=not has_accel)  # cpu=True: gloo process group on CPU-only machines
    return _SingleProcess()


# ------------------------------------------------------------------------------- manifest
def _describe(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=lambda o: type(o).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def _check_compatible(out_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    checks = [
        ("protocol", "protocol"),
        ("flow_config_key", "FlowConfig"),
        ("model_fingerprint", "model fingerprint"),
        ("plan", "dataset (examples, order, prompts or shard_size)"),
        ("generation", "generation settings (max_new_tokens, judge, postprocess, generate kwargs)"),
    ]
    from hf_flowcheck.fingerprint import CHECKED_FIELDS  # identity of the weights; base_id/revision are informative

    def same(key: str) -> bool:
        if key == "model_fingerprint":
            a, b = old.get(key) or {}, new.get(key) or {}
            return all(a.get(k) == b.get(k) for k in CHECKED_FIELDS)
        return old.get(key) == new.get(key)

    diffs = []
    for key, what in checks:
        if not same(key):
            if key == "model_fingerprint":
                a, b = old.get(key) or {}, new.get(key) or {}
                keys = [k for k in CHECKED_FIELDS if a.get(k) != b.get(k)]
                detail = "; ".join(f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in keys[:6])
            elif key == "flow_config_key":
                a = json.loads(old.get(key) or "{}")
                b = json.loads(new.get(key) or "{}")
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = "; ".join(f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in keys)
            else:
                detail = f"stored {_describe(old.get(key))}, now {_describe(new.get(key))}"
            diffs.append(f"  - {what} differs: {detail}")
    if diffs:
        raise ExtractionMismatchError(
            f"{out_dir} already holds features extracted with a different setup, so they cannot be resumed "
            "or mixed:\n" + "\n".join(diffs) + "\nUse a new out_dir (--out) for this setup, or rerun with the same "
            "model, FlowConfig, protocol and dataset to resume the existing extraction."
        )


def _shard_entry(out_dir: Path, index: int, digest: str | None = None) -> dict[str, Any]:
    path = out_dir / shard_name(index)
    meta = read_shard_metadata(path)
    counts = meta.get("counts", {})
    return {
        "index": index,
        "file": shard_name(index),
        "sha256": digest or file_sha256(path),
        "num_samples": int(counts.get("stored", len(meta.get("uids", [])))),
        "num_inputs": int(counts.get("inputs", 0)),
        "counts": counts,
    }


def _totals(entries: list[dict[str, Any]], excluded: int) -> dict[str, int]:
    totals = _empty_counts()
    for e in entries:
        for k in totals:
            totals[k] += int(e["counts"].get(k, 0))
    totals["excluded"] = excluded
    return totals


def _setup_key(header: dict[str, Any]) -> str:
    """What makes two shards' features comparable: protocol, FlowConfig, the model's weights, generation."""
    from hf_flowcheck.fingerprint import CHECKED_FIELDS

    fp = header.get("model_fingerprint") or {}
    parts = [
        header["protocol"],
        header["flow_config_key"],
        {k: fp.get(k) for k in CHECKED_FIELDS},
        header["generation"],
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _shard_is_done(
    out_dir: Path, index: int, plan_key: str, recorded: dict[int, str], setup_key: str, *, listed: bool
) -> bool:
    """Whether shard ``index`` on disk can be kept.

    A shard the manifest lists is checked against its recorded hash. One it does not list yet (a kill
    between writing the shard and the manifest, or a deleted manifest) is adopted only when it was
    written for the same examples (``plan_key``) under the same setup (``setup_key``).
    """
    path = out_dir / shard_name(index)
    if not path.is_file():
        return False
    if index in recorded:
        verify_shard(path, recorded[index])  # corrupt -> clear error naming the file
    try:
        meta = read_shard_metadata(path)
    except Exception as err:
        raise FeatureStoreError(
            f"Feature shard {path} cannot be read ({err}). Delete it and rerun the extraction to regenerate it."
        ) from None
    same_plan = meta.get("plan_key") == plan_key and int(meta.get("shard", -1)) == index
    if index in recorded:
        return same_plan
    if meta.get("setup_key") == setup_key and same_plan:
        return True
    if not listed:
        # No manifest says what this directory holds: never overwrite a shard we cannot place.
        raise FeatureStoreError(
            f"{path} was written for other examples or another setup (FlowConfig, model, protocol or generation "
            f"settings) and {out_dir} has no manifest.json to say which. Use a new out_dir, or delete the shard "
            "files that do not belong to this extraction."
        )
    return False


# -------------------------------------------------------------------------------- public
def _one_writer(fn: Callable[..., FeatureStore]) -> Callable[..., FeatureStore]:
    """One writer per store: a second run's temp cleanup would delete the first one's manifest.

    The processes of one ``accelerate launch`` write a store together by design, so only a
    single-process run takes the lock.
    """

    @functools.wraps(fn)
    def locked(
        model: Any, tokenizer: Any, examples: Any, out_dir: str | os.PathLike[str], **kwargs: Any
    ) -> FeatureStore:
        single = int(_resolve_state(kwargs.get("accelerator")).num_processes) == 1
        with exclusive_writer(out_dir, "feature store") if single else contextlib.nullcontext():
            return fn(model, tokenizer, examples, out_dir, **kwargs)

    return locked


@_one_writer
def extract_dataset(
    model: Any,
    tokenizer: Any,
    examples: Sequence[LabeledExample] | Sequence[Example],
    out_dir: str | os.PathLike[str],
    *,
    config: FlowConfig,
    extract_config: ExtractConfig | None = None,
    judge: Any = None,
    accelerator: Any = None,
    prompt_fn: Callable[[Example], str] | None = None,
    postprocess: Callable[[str], str] | None = clean_generation,
    dataset: str | dict[str, Any] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> FeatureStore:
    """Extract flow signatures of a dataset into safetensors shards (resumable, data-parallel).

    Shard ``i`` holds examples ``[i * shard_size, (i + 1) * shard_size)`` (after few-shot records are
    excluded), so the stored features do not depend on the number of processes. Within a shard,
    examples are batched longest-first and stored back in input order.

    Args:
        model: A transformers causal LM (any ``device_map``; it is never moved).
        tokenizer: Its tokenizer (only ``tokenizer(text)["input_ids"]`` and ``decode`` are used).
        examples: ``protocol="paired"``/``"natural"``: :class:`~hf_flowcheck.data.LabeledExample`
            items (prompt + ``completion`` teacher-forced; features over the completion tokens).
            ``protocol="generated"``: :class:`~hf_flowcheck.data.Example` records; the model answers
            ``prompt_fn(record)`` greedily and ``judge`` labels the answer.
        out_dir: Output directory (created; see :mod:`hf_flowcheck.workflows.store` for the layout).
        config: Flow configuration.
        extract_config: How to run (:class:`~hf_flowcheck.workflows.extract_config.ExtractConfig`:
            ``protocol`` -- ``"paired"``, ``"natural"``, ``"generated"`` or ``"replayed"``, recorded,
            never mixed -- ``batch_size``, ``shard_size`` (input examples per shard),
            ``max_new_tokens`` (generated protocol), ``resume`` (reuse complete shards of an earlier
            run with the same setup; ``False`` refuses a non-empty ``out_dir``) and ``progress`` (a
            tqdm bar on the main process)). ``**options`` set or override its fields:
            ``extract_dataset(..., protocol="paired", batch_size=4)``.
        judge: Generated protocol: a :class:`~hf_flowcheck.data.Judge` or callable, or
            ``"record-label"`` to keep each record's own label; default
            :class:`~hf_flowcheck.data.ReferenceF1Judge`. Answers it leaves unlabelled (dropped/
            failed) are counted in the manifest and not stored.
        accelerator: ``accelerate.Accelerator``/``PartialState``; with ``num_processes > 1`` each
            process extracts shards ``i`` with ``i % num_processes == process_index``. Defaults to a
            ``PartialState`` when ``WORLD_SIZE > 1`` (an ``accelerate launch``), else one process.
        prompt_fn: Generated protocol: ``record -> prompt`` (default
            :func:`~hf_flowcheck.data.generation_prompt`: plain 2-shot for QA).
        postprocess: Generated protocol: raw continuation -> judged answer (default: first line).
            Stored features cover the fewest generated tokens that decode to the judged answer.
        dataset: Name or dict describing the data, recorded in the manifest.
        generate_kwargs: Extra ``generate`` arguments (greedy decoding is the protocol).
        **options: :class:`ExtractConfig` fields.

    Returns:
        The opened :class:`~hf_flowcheck.workflows.store.FeatureStore` (on every process).

    Raises:
        ExtractionMismatchError: ``out_dir`` holds features of another model / config / protocol /
            dataset; the message lists what differs.
        CorruptShardError: An existing shard's hash differs from the manifest.
        ValueError: Bad arguments (unknown protocol, non-positive sizes, unlabelled paired items).
        WriterBusyError: Another process (not one of this run's ``accelerate`` processes) is writing
            ``out_dir``; its PID is named.
    """
    run = ExtractConfig.with_options(extract_config, options)
    protocol, shard_size, max_new_tokens = run.protocol, run.shard_size, run.max_new_tokens
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a FlowConfig, got {type(config).__name__}.")
    generate_kwargs = dict(generate_kwargs or {})
    if protocol == "generated":
        if judge is None:
            from hf_flowcheck.data import ReferenceF1Judge

            judge = ReferenceF1Judge()
        judge_fn: Any = judge if judge == RECORD_LABEL else as_judge(judge)
    else:
        judge_fn = None

    state = _resolve_state(accelerator)
    n_proc, rank = int(state.num_processes), int(state.process_index)
    is_main = bool(state.is_main_process)
    out = Path(out_dir)

    items, excluded = _items(examples, protocol, prompt_fn)
    shards = [items[s : s + shard_size] for s in range(0, len(items), shard_size)]
    shard_keys = [_plan_key(s) for s in shards]
    ext = FlowExtractor(model, config, tokenizer=tokenizer)
    gen_info = (
        {
            "max_new_tokens": max_new_tokens,
            "judge": judge if judge == RECORD_LABEL else repr(judge_fn),
            "postprocess": getattr(postprocess, "__name__", repr(postprocess)),
            "generate_kwargs": _describe(generate_kwargs),
        }
        if protocol == "generated"
        else None
    )
    if isinstance(dataset, str):
        dataset = {"name": dataset}
    header = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "hf_flowcheck_version": __version__,
        "protocol": protocol,
        "flow_config": config.to_dict(),
        "flow_config_key": config.signature_key(),
        "feature_names": list(config.feature_names),
        "num_blocks": ext.arch.num_blocks,
        "model_fingerprint": _model_fingerprint(model),
        "dataset": {
            **(dataset or {}),
            "num_examples": len(examples),
            "tasks": sorted({getattr(e, "task", "?") for e in examples}),
        },
        "plan": {
            "plan_key": hashlib.sha256("".join(shard_keys).encode()).hexdigest(),
            "num_items": len(items),
            "shard_size": shard_size,
            "num_shards": len(shards),
        },
        "generation": gen_info,
    }

    # 1. Every process checks an existing manifest itself (they all refuse the same way).
    old = read_manifest(out) if out.exists() else None
    recorded: dict[int, str] = {}
    if old is not None:
        if not run.resume:
            raise FileExistsError(
                f"{out} already holds a feature store and resume=False; choose a new out_dir or delete it."
            )
        _check_compatible(out, old, header)
        recorded = {int(e["index"]): e["sha256"] for e in old.get("shards", [])}
    # Which shards on disk can be kept, decided before any manifest is written: without one (a deleted
    # manifest) each shard file is re-adopted only after checking what it holds, and a foreign one is refused.
    setup_key = _setup_key(header)
    listed = old is not None
    done_on_disk = {
        i: _shard_is_done(out, i, shard_keys[i], recorded, setup_key, listed=listed) if out.exists() else False
        for i in range(len(shards))
    }
    state.wait_for_everyone()
    entries: dict[int, dict[str, Any]] = {
        int(e["index"]): e for e in (old or {}).get("shards", []) if int(e["index"]) < len(shards)
    }

    def manifest(status: str) -> dict[str, Any]:
        listed = [entries[i] for i in sorted(entries)]
        return {**header, "status": status, "shards": listed, "counts": _totals(listed, excluded)}

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        write_manifest(out, manifest("in_progress"))
    state.wait_for_everyone()

    # 2. Each process extracts its strided share of the shards.
    mine = [i for i in range(len(shards)) if i % n_proc == rank]
    todo = [i for i in mine if not done_on_disk[i]]
    total = sum(len(shards[i]) for i in mine)
    done = total - sum(len(shards[i]) for i in todo)
    bar = None
    if run.progress and is_main:
        from tqdm.auto import tqdm

        desc = f"extract {protocol}" + (f" (process 0 of {n_proc})" if n_proc > 1 else "")
        bar = tqdm(total=total, initial=done, unit="sample", desc=desc, dynamic_ncols=True)
    pad_id = pad_token_id(model, tokenizer, eos_fallback=True, default=0)
    try:
        for i in todo:
            shard = _extract_shard(
                ext,
                tokenizer,
                shards[i],
                i,
                shard_keys[i],
                run=run,
                judge=judge_fn,
                postprocess=postprocess,
                generate_kwargs=generate_kwargs,
                pad_id=pad_id,
                setup_key=setup_key,
                on_batch=(bar.update if bar is not None else (lambda n: None)),
            )
            digest = write_shard(out / shard_name(i), shard)
            if is_main:
                entries[i] = _shard_entry(out, i, digest)
                write_manifest(out, manifest("in_progress"))
            if _after_shard_hook is not None:
                _after_shard_hook(i)
    finally:
        if bar is not None:
            bar.close()

    # 3. After everyone is done, the main process lists every shard with its hash.
    state.wait_for_everyone()
    if is_main:
        written = {i: e["sha256"] for i, e in entries.items() if i in todo}
        missing = [shard_name(i) for i in range(len(shards)) if not (out / shard_name(i)).is_file()]
        if missing:
            raise FeatureStoreError(
                f"{out} lacks {', '.join(missing)} after every process finished; a process failed. Rerun the same "
                "command to resume."
            )
        entries = {i: _shard_entry(out, i, written.get(i)) for i in range(len(shards))}
        write_manifest(out, manifest("complete"))
    state.wait_for_everyone()
    return FeatureStore.open(out, verify=False)


# ------------------------------------------------------------------------------------ CLI
def newline_stop_kwargs(tokenizer: Any) -> dict[str, Any]:
    """``generate`` kwargs that end a row at the end of its first non-empty line.

    Built once (the vocabulary scan is slow); :func:`~hf_flowcheck.stopping.bind_prompt_width`
    binds it to each batch. Leading newlines do not stop a row: with a plain stop at ``"\\n"``,
    21% of SmolLM2-135M's HaluEval-QA answers were empty.
    """
    from transformers import StoppingCriteriaList

    if not supports_answer_line_stop(tokenizer):
        return {}  # not a transformers tokenizer: rows run to max_new_tokens; the answer is still the first line
    return {"stopping_criteria": StoppingCriteriaList([AnswerLineStop(tokenizer)])}
