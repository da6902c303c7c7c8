"""Side-by-side comparison of detectors on one model, one dataset and one split (``flowcheck compare``).

:func:`compare_detectors` runs every detector on the same train / validation / test split
(grouped by source record, ``evaluation.md``): trainable detectors are fitted on train and
select on validation; every detector is scored on validation (for thresholds and the fused
detector) and on test (the reported numbers, with 95% bootstrap intervals). Each detector's cost
is the wall time of its model work per test sample divided by the time of plain greedy generation
of the same prompts, measured once in the same run.

Abstention: besides the area under the risk-coverage curve (AURC) of every detector, an
:func:`abstention_policy` picks on validation the threshold with the largest coverage whose
selective risk stays at or below a target, and the policy is then applied once to test.

The fused detector stacks a logistic regression on the validation scores of the flow validator,
the hidden-state probe and the four token-confidence statistics (whichever of them ran).

:func:`gradient_layer_ablation` measures where the gradient signal lives (AUROC of each contiguous
band of blocks and of all blocks, the share held by the last band) and what the band costs.

Example:
    >>> import numpy as np
    >>> p = abstention_policy(np.array([0.1, 0.2, 0.3, 0.9]), np.array([0, 0, 1, 1]), target_risk=0.0)
    >>> p["threshold"], p["coverage"]
    (0.2, 0.5)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_flowcheck.data.splits import SPLIT_NAMES
from hf_flowcheck.detectors.base import Detector, ScoredExample, scored_examples
from hf_flowcheck.detectors.baselines import (
    HiddenStateProbe,
    TokenConfidenceDetector,
)
from hf_flowcheck.detectors.flow_detector import FlowValidatorDetector
from hf_flowcheck.detectors.fused import FusedDetector
from hf_flowcheck.detectors.gradient import GradientConfig, GradientDetector, gradient_signature, gradient_signatures
from hf_flowcheck.detectors.registry import registered_detectors
from hf_flowcheck.metrics import aurc, auroc, bootstrap_ci, evaluate_scores
from hf_flowcheck.model_io import input_device, pad_token_id
from hf_flowcheck.stopping import bind_prompt_width

__all__ = [
    "DETECTOR_CHOICES",
    "FlowValidatorDetector",
    "FusedDetector",
    "GenerationTiming",
    "abstention_policy",
    "apply_abstention",
    "compare_detectors",
    "examples_from_store",
    "gradient_layer_ablation",
    "measure_gradient_cost",
    "split_parts",
]

#: The detector names ``flowcheck compare`` knows (:mod:`hf_flowcheck.detectors.registry`, at import time).
DETECTOR_CHOICES = tuple(registered_detectors())


# ---------------------------------------------------------------------------------------------
# Abstention
# ---------------------------------------------------------------------------------------------


def abstention_policy(val_scores: Any, val_labels: Any, target_risk: float = 0.1) -> dict[str, Any]:
    """Choose on validation the threshold "answer when ``score <= threshold``, else abstain".

    Among the thresholds at the distinct validation scores, the one with the largest coverage whose
    selective risk (fraction of hallucinated among the answered) is at most ``target_risk``.
    Ties are kept together (all items with the same score are answered or none).

    Args:
        val_scores: ``[M]`` validation scores (higher = more likely hallucinated).
        val_labels: ``[M]`` 0/1 labels.
        target_risk: Largest acceptable selective risk, in ``[0, 1]``.

    Returns:
        ``{"threshold", "target_risk", "coverage", "risk", "n"}`` on validation; ``threshold`` is
        ``-inf`` (abstain on everything, coverage 0) when no threshold reaches the target.

    Raises:
        ValueError: ``target_risk`` outside ``[0, 1]``, or bad inputs.
    """
    if not 0.0 <= float(target_risk) <= 1.0:
        raise ValueError(
            f"target_risk={target_risk!r} must be in [0, 1] (e.g. 0.1 = at most 10% hallucinated answers)."
        )
    s = np.asarray(val_scores, dtype=np.float64).reshape(-1)
    y = np.asarray(val_labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"val_scores ({s.size}) and val_labels ({y.size}) must be non-empty and of equal length.")
    if np.isnan(s).any():
        raise ValueError("val_scores contain NaN; drop those items before choosing a threshold.")
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]  # last index of each distinct value
    kept = last + 1
    risk = np.cumsum(y_sorted)[last] / kept
    ok = np.flatnonzero(risk <= float(target_risk) + 1e-12)
    if ok.size == 0:
        return {
            "threshold": float("-inf"),
            "target_risk": float(target_risk),
            "coverage": 0.0,
            "risk": None,
            "n": int(s.size),
        }
    i = ok[-1]
    return {
        "threshold": float(s_sorted[last[i]]),
        "target_risk": float(target_risk),
        "coverage": float(kept[i] / s.size),
        "risk": float(risk[i]),
        "n": int(s.size),
    }


def apply_abstention(scores: Any, labels: Any, threshold: float) -> dict[str, Any]:
    """Coverage and selective risk of "answer when ``score <= threshold``" on a split.

    Returns:
        ``{"threshold", "coverage", "risk", "n_answered", "n"}`` (``risk`` is ``None`` when nothing is answered).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    keep = s <= threshold
    n = int(keep.sum())
    return {
        "threshold": float(threshold),
        "coverage": float(n / s.size) if s.size else 0.0,
        "risk": float(y[keep].mean()) if n else None,
        "n_answered": n,
        "n": int(s.size),
    }


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(model: nn.Module) -> None:
    dev = input_device(model)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(model)
    t0 = time.perf_counter()
    out = fn()
    _sync(model)
    return out, time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    """The plain greedy generation that :func:`compare_detectors` divides every detector's cost by.

    Attributes:
        max_new_tokens: Length cap of the timed generation.
        prompts: Time the first this many distinct test prompts (``None``: all); the per-sample
            denominator is scaled to the whole test split.
        generate_kwargs: Extra ``generate`` arguments, e.g. the generated protocol's
            :class:`~hf_flowcheck.stopping.AnswerLineStop` (bound to each prompt's width).
    """

    max_new_tokens: int = 32
    prompts: int | None = 32
    generate_kwargs: dict[str, Any] | None = None


@torch.no_grad()
def time_generation(
    model: nn.Module,
    examples: Sequence[ScoredExample],
    *,
    max_new_tokens: int = 32,
    tokenizer: Any = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Seconds of plain greedy generation per distinct prompt (one prompt per ``generate`` call).

    Returns:
        ``{"seconds_per_prompt", "prompts", "mean_new_tokens", "max_new_tokens"}``.
    """
    dev = input_device(model)
    prompts = list(dict.fromkeys(tuple(e.prompt_ids) for e in examples))
    if not prompts:
        raise ValueError("time_generation() got no examples.")
    pad = pad_token_id(model, tokenizer, eos_fallback=True, default=0)
    ids0 = torch.tensor([list(prompts[0])], device=dev)
    model.generate(
        input_ids=ids0, attention_mask=torch.ones_like(ids0), do_sample=False, max_new_tokens=2, pad_token_id=pad
    )
    total, new = 0.0, 0
    for p in prompts:
        ids = torch.tensor([list(p)], device=dev)
        kwargs = bind_prompt_width(dict(generate_kwargs or {}), ids.shape[1])
        seqs, dt = _timed(
            model,
            lambda ids=ids, kwargs=kwargs: model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **kwargs,
            ),
        )
        total += dt
        new += int(seqs.shape[1] - ids.shape[1])
    return {
        "seconds_per_prompt": total / len(prompts),
        "prompts": len(prompts),
        "mean_new_tokens": new / len(prompts),
        "max_new_tokens": int(max_new_tokens),
    }


@torch.no_grad()

# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def split_parts(examples: Sequence[ScoredExample], split: Any) -> dict[str, list[ScoredExample]]:
    sets = {name: set(split[name]) for name in SPLIT_NAMES}
    parts = {name: [e for e in examples if e.uid in sets[name]] for name in SPLIT_NAMES}
    for name in SPLIT_NAMES:
        if not parts[name]:
            raise ValueError(
                f"The {name} split holds none of the examples; build the split from these examples' uids "
                "(hf_flowcheck.data.split_records([e.uid for e in examples]))."
            )
        missing = [i for i, e in enumerate(parts[name]) if e.label not in (0, 1)]
        if missing:
            raise ValueError(
                f"{len(missing)} {name} example(s) have no 0/1 label (first uid {parts[name][missing[0]].uid!r}); "
                "drop judge-dropped answers before comparing."
            )
    return parts


def _labels(examples: Sequence[ScoredExample]) -> np.ndarray:
    return np.asarray([int(e.label) for e in examples], dtype=np.int64)  # type: ignore[arg-type]


def compare_detectors(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ScoredExample],
    split: Any,
    detectors: Sequence[Detector],
    *,
    protocol: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    target_risk: float = 0.1,
    fuse: bool = True,
    timing: GenerationTiming | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every detector on the same split and report metrics, costs and abstention.

    Args:
        model: The base causal LM (eval mode).
        tokenizer: Its tokenizer (sampling agreement decodes text; special tokens for the flow
            extraction).
        examples: Labelled :class:`~hf_flowcheck.detectors.base.ScoredExample` items (``uid``,
            ``label`` 0/1), e.g. from :func:`examples_from_store` or
            :func:`~hf_flowcheck.detectors.base.scored_examples`.
        split: A :class:`~hf_flowcheck.data.Split` (or ``{"train"|"validation"|"test": uids}``).
        detectors: The detectors; trainable ones are fitted on train and select on validation
            (an already-fitted detector is kept as is). Detectors whose ``protocols`` exclude
            ``protocol`` are skipped (listed in ``"skipped"``).
        protocol: ``"generated"``, ``"paired"`` or ``"natural"`` (recorded; filters detectors).
        n_bootstrap: Bootstrap resamples of the 95% intervals (1000 for reported numbers).
        seed: Bootstrap seed.
        target_risk: Selective-risk target of the validation-chosen abstention policy.
        fuse: Add the fused detector when at least two of flow validator / probe / confidence ran.
        timing: The timed plain generation that every cost is divided by
            (:class:`GenerationTiming`; its defaults when omitted).
        progress: Optional ``callback(message)``.

    Returns:
        A JSON-serialisable dict: ``protocol``, ``sizes`` (per split), ``generation`` (the timed
        denominator), ``rows`` (``{detector name: evaluate_scores result}`` on test, each with
        ``cost_ratio``, ``cost_seconds_per_sample``, ``aurc``, ``abstention`` = the validation
        policy and its test outcome), ``fused_weights``, ``skipped``, and ``scores``
        (``{name: {"validation": [...], "test": [...]}}``) with ``labels`` per split.
    """
    say = progress or (lambda msg: None)
    parts = split_parts(examples, split)
    labels = {name: _labels(parts[name]) for name in SPLIT_NAMES}
    test_prompts = list(dict.fromkeys(tuple(e.prompt_ids) for e in parts["test"]))
    timing = timing if timing is not None else GenerationTiming()
    n_timed = timing.prompts
    timed_prompts = set(test_prompts if n_timed is None else test_prompts[: max(1, int(n_timed))])
    say(f"timing plain greedy generation of {len(timed_prompts)} of the {len(test_prompts)} test prompts")
    gen = time_generation(
        model,
        [e for e in parts["test"] if tuple(e.prompt_ids) in timed_prompts],
        max_new_tokens=timing.max_new_tokens,
        tokenizer=tokenizer,
        generate_kwargs=timing.generate_kwargs,
    )
    gen_per_sample = gen["seconds_per_prompt"] * len(test_prompts) / len(parts["test"])
    cache: dict[tuple[str, str], tuple[Any, float]] = {}

    def feats(det: Detector, name: str) -> tuple[Any, float]:
        key = (det.feature_key, name)
        if key not in cache:
            say(f"{det.name}: {name} features ({len(parts[name])} examples)")
            cache[key] = _timed(model, lambda: det.featurize(model, parts[name], tokenizer=tokenizer))
        return cache[key]

    rows: dict[str, Any] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    skipped: dict[str, str] = {}
    ran: list[tuple[str, Detector, float]] = []  # (row name, detector, seconds per test sample)
    for det in detectors:
        if protocol is not None and det.protocols is not None and protocol not in det.protocols:
            skipped[det.name] = f"only meaningful for protocol(s) {list(det.protocols)}, not {protocol!r}"
            continue
        if det.trainable and not det.is_fitted:
            tr, _ = feats(det, "train")
            va, _ = feats(det, "validation")
            say(f"{det.name}: fitting")
            det.fit(tr, labels["train"], va, labels["validation"])
        name = det.name  # after fitting: may name the selected layer
        while name in rows:
            name += "'"
        va, _ = feats(det, "validation")
        te, seconds = feats(det, "test")
        s_val, s_test = det.score(va), det.score(te)
        per_sample = seconds / len(parts["test"])
        ran.append((name, det, per_sample))
        scores[name] = {"validation": s_val.tolist(), "test": s_test.tolist()}
        rows[name] = _row(
            name, labels, s_val, s_test, per_sample / gen_per_sample, per_sample, n_bootstrap, seed, target_risk
        )
        rows[name]["score_range"] = det.score_range
        rows[name]["trainable"] = bool(det.trainable)

    fused_weights: dict[str, float] = {}
    if fuse:
        stackable = (FlowValidatorDetector, HiddenStateProbe, TokenConfidenceDetector)
        comps = [(n, d, c) for n, d, c in ran if isinstance(d, stackable)]
        names = [n for n, _, _ in comps]
        if len(comps) >= 2:
            say(f"fused detector over {names}")
            fused = FusedDetector().fit({n: np.asarray(scores[n]["validation"]) for n in names}, labels["validation"])
            s_val = fused.score({n: np.asarray(scores[n]["validation"]) for n in names})
            s_test = fused.score({n: np.asarray(scores[n]["test"]) for n in names})
            # components sharing a forward (the four confidence statistics) count it once
            per_sample = sum({d.feature_key: c for _, d, c in comps}.values())
            name = fused.name
            scores[name] = {"validation": s_val.tolist(), "test": s_test.tolist()}
            rows[name] = _row(
                name, labels, s_val, s_test, per_sample / gen_per_sample, per_sample, n_bootstrap, seed, target_risk
            )
            rows[name]["components"] = names
            rows[name]["trainable"] = True
            rows[name]["note"] = (
                "fitted on the validation split, so its validation-chosen abstention threshold is optimistic"
            )
            fused_weights = fused.weights()
        else:
            skipped["fused"] = f"needs two of flow validator / probe / token confidence, got {names}"

    return {
        "protocol": protocol,
        "sizes": {name: len(parts[name]) for name in SPLIT_NAMES},
        "generation": {**gen, "seconds_per_sample": gen_per_sample},
        "rows": rows,
        "fused_weights": fused_weights,
        "skipped": skipped,
        "scores": scores,
        "labels": {name: labels[name].tolist() for name in ("validation", "test")},
        "uids": {name: [e.uid for e in parts[name]] for name in ("validation", "test")},
        "target_risk": float(target_risk),
    }


def _row(
    name: str,
    labels: dict[str, np.ndarray],
    s_val: np.ndarray,
    s_test: np.ndarray,
    cost_ratio: float,
    seconds: float,
    n_bootstrap: int,
    seed: int,
    target_risk: float,
) -> dict[str, Any]:
    row = evaluate_scores(labels["test"], s_test, name=name, n_bootstrap=n_bootstrap, seed=seed, cost_ratio=cost_ratio)
    row["cost_seconds_per_sample"] = float(seconds)
    row["aurc"] = aurc(labels["test"], s_test)
    policy = abstention_policy(s_val, labels["validation"], target_risk)
    row["abstention"] = {"validation": policy, "test": apply_abstention(s_test, labels["test"], policy["threshold"])}
    return row


# ---------------------------------------------------------------------------------------------
# Layer ablation of the gradient signal
# ---------------------------------------------------------------------------------------------


def measure_gradient_cost(
    model: nn.Module,
    examples: Sequence[ScoredExample],
    *,
    config: GradientConfig | None = None,
    band: int = 5,
    repeats: int = 3,
) -> dict[str, Any]:
    """Cost of one gradient signature as a ratio to one no-grad forward pass of the same sequence.

    For each example the plain forward, the signature of the last ``band`` blocks and the signature
    of all blocks are timed back to back (``repeats`` rounds, after a warm-up), so that they see the
    same machine load; the ratios are of the medians.

    Returns:
        ``{"forward_seconds", "last_band_seconds", "all_seconds", "last_band_ratio", "all_ratio",
        "band", "examples", "repeats"}``.
    """
    if not examples:
        raise ValueError("measure_gradient_cost() needs at least one example.")
    cfg = config or GradientConfig()
    dev = input_device(model)
    n_blocks = len(_block_count(model))
    band = min(int(band), n_blocks)
    c_last, c_all = dataclasses.replace(cfg, layers=band), dataclasses.replace(cfg, layers="all")

    def forward(e: ScoredExample) -> None:
        with torch.no_grad():
            model(input_ids=torch.tensor([e.input_ids], device=dev), use_cache=False)

    for c in (c_last, c_all):  # warm-up (sketch matrices, allocator)
        gradient_signature(model, *_one(examples[0]), c)
    forward(examples[0])
    times: dict[str, list[float]] = {"forward": [], "last": [], "all": []}
    for _ in range(max(1, int(repeats))):
        for e in examples:
            times["forward"].append(_timed(model, lambda e=e: forward(e))[1])
            times["last"].append(_timed(model, lambda e=e: gradient_signature(model, *_one(e), c_last))[1])
            times["all"].append(_timed(model, lambda e=e: gradient_signature(model, *_one(e), c_all))[1])
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "forward_seconds": med["forward"],
        "last_band_seconds": med["last"],
        "all_seconds": med["all"],
        "last_band_ratio": med["last"] / med["forward"],
        "all_ratio": med["all"] / med["forward"],
        "band": band,
        "examples": len(examples),
        "repeats": int(repeats),
    }


def _block_count(model: nn.Module) -> list[Any]:
    from hf_flowcheck.architectures import resolve_architecture

    return resolve_architecture(model).blocks


def gradient_layer_ablation(
    model: nn.Module,
    train: Sequence[ScoredExample],
    validation: Sequence[ScoredExample],
    test: Sequence[ScoredExample],
    *,
    config: GradientConfig | None = None,
    band: int = 5,
    stride: int = 1,
    n_bootstrap: int = 200,
    seed: int = 0,
    cost_examples: int = 8,
) -> dict[str, Any]:
    """AUROC of the gradient detector per contiguous band of blocks and for all blocks.

    Signatures are computed once with ``layers="all"`` and sliced: the gradient of a block's
    parameters does not depend on where the backward stops below it, so a band's slice equals
    the signature computed with that band alone.

    Args:
        model: The base causal LM.
        train: Training examples (fit references and reader).
        validation: Validation examples (select the reader's epoch).
        test: Test examples (AUROC with a 95% bootstrap interval).
        config: Reader/sketch settings (``layers`` is replaced per band).
        band: Blocks per band (5 in the article; capped at the number of blocks).
        stride: Step between band starts (1: every contiguous band).
        n_bootstrap: Resamples of the AUROC intervals.
        seed: Bootstrap seed.
        cost_examples: Test examples timed for the cost ratios.

    Returns:
        ``{"bands": [{"blocks", "auroc", "low", "high"}], "all": {...}, "last_band": {...},
        "share_last_band": (AUROC_last − 0.5)/(AUROC_all − 0.5) or None, "cost": ...}`` where ``cost`` is
        :func:`measure_gradient_cost` (ratios to one no-grad forward of the same sequence). The share is
        only meaningful when ``AUROC_all`` is clearly above 0.5.
    """
    cfg = config or GradientConfig()
    all_cfg = dataclasses.replace(cfg, layers="all")
    sig = {
        name: gradient_signatures(model, part, all_cfg)
        for name, part in (("train", train), ("validation", validation), ("test", test))
    }
    y = {name: _labels(part) for name, part in (("train", train), ("validation", validation), ("test", test))}
    n_blocks = sig["train"].shape[1]
    band = min(int(band), n_blocks)

    def run(blocks: list[int]) -> dict[str, Any]:
        det = GradientDetector(dataclasses.replace(cfg, layers=blocks))
        det.fit(sig["train"][:, blocks], y["train"], sig["validation"][:, blocks], y["validation"])
        s = det.score(sig["test"][:, blocks])
        lo, hi = bootstrap_ci(auroc, y["test"], s, n=n_bootstrap, seed=seed)
        return {"blocks": blocks, "auroc": _nan_none(auroc(y["test"], s)), "low": _nan_none(lo), "high": _nan_none(hi)}

    bands = [run(list(range(st, st + band))) for st in range(0, n_blocks - band + 1, max(1, int(stride)))]
    last = list(range(n_blocks - band, n_blocks))
    last_row = next((b for b in bands if b["blocks"] == last), None) or run(last)
    all_row = run(list(range(n_blocks)))
    share = None
    if last_row["auroc"] is not None and all_row["auroc"] is not None and abs(all_row["auroc"] - 0.5) > 1e-12:
        share = (last_row["auroc"] - 0.5) / (all_row["auroc"] - 0.5)

    timed = list(test[: max(1, cost_examples)])
    cost = measure_gradient_cost(model, timed, config=cfg, band=band)
    return {
        "num_blocks": int(n_blocks),
        "band": band,
        "bands": bands,
        "last_band": last_row,
        "all": all_row,
        "share_last_band": share,
        "cost": cost,
    }


def _one(e: ScoredExample) -> tuple[torch.Tensor, None, torch.Tensor]:
    ids = torch.tensor([e.input_ids], dtype=torch.long)
    ans = torch.zeros_like(ids)
    ans[0, len(e.prompt_ids) :] = 1
    return ids, None, ans


def _nan_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ---------------------------------------------------------------------------------------------
# From a feature store
# ---------------------------------------------------------------------------------------------


def _load_records(dataset: Mapping[str, Any], data_dir: str | None) -> list[Any]:
    from hf_flowcheck import data

    name = str(dataset.get("name") or "")
    try:
        return data.load_by_name(name, data_dir, task=(dataset.get("tasks") or ["qa"])[0], limit=dataset.get("limit"))
    except ValueError as err:
        raise ValueError(
            f"The feature store's manifest names dataset {name!r}, which cannot be reloaded ({err}); the prompts are "
            "rebuilt from the records, so the data must be available."
        ) from None


def generated_completion(raw: str | None, answer: str) -> str:
    """The generated text up to the end of the judged ``answer`` (``""``: let the prompt decide).

    The judged answer is the first non-empty line of the model's raw continuation; teacher-forcing
    the raw text up to its end (leading newlines included) replays the tokens the model produced,
    where ``" " + answer`` would not when the model began with a newline.
    """
    if not isinstance(raw, str) or not answer or answer not in raw:
        return ""
    return raw[: raw.index(answer) + len(answer)]


def _examples_from_answers(store: Any, tokenizer: Any, dataset: Mapping[str, Any]) -> list[ScoredExample]:
    from hf_flowcheck.detectors.base import encode_text
    from hf_flowcheck.workflows.answers import read_answers

    path = dataset.get("answers")
    if not path or not Path(path).is_file():
        raise ValueError(
            f"The replayed store names answers file {path!r}, which is not here; run from the folder it was replayed "
            "in (the path is relative to it) or restore the committed answers file."
        )
    by_uid = {r.uid: r for r in read_answers(path).records}
    out = []
    for row in store.samples():
        rec = by_uid.get(row["uid"])
        if rec is None:
            raise ValueError(f"uid {row['uid']!r} of the store is not in {path}; the store and file do not match.")
        if not rec.gen_ids:
            continue  # an empty answer: nothing for any detector to score
        prompt_ids = encode_text(tokenizer, rec.prompt)
        out.append(
            ScoredExample(
                prompt_ids, list(rec.gen_ids), int(row["label"]), rec.uid, rec.prompt, rec.answer, "generated"
            )
        )
    return out


def examples_from_store(store: Any, tokenizer: Any, *, data_dir: str | None = None) -> list[ScoredExample]:
    """Rebuild the labelled examples of a feature store (``flowcheck extract`` output).

    The store's uids and labels define the examples. Replayed protocol (part stores of
    ``flowcheck replay``): prompt and generated tokens come from the committed answers file, split by
    the same rule the replay used. Generated protocol: the prompt is rebuilt
    with :func:`hf_flowcheck.data.generation_prompt` (the store's prompt style) from the record
    of each uid and the answer is the store's ``answer`` metadata, teacher-forced as the raw
    generated text up to its end (:func:`generated_completion`); paired / natural: the
    examples of :func:`~hf_flowcheck.data.paired_examples` / ``natural_examples`` matched by
    ``(uid, source)``.

    Returns:
        :class:`ScoredExample` items in store order.
    """
    from hf_flowcheck import data

    manifest = store.manifest
    dataset = manifest.get("dataset") or {}
    if store.protocol == "replayed":
        return _examples_from_answers(store, tokenizer, dataset)
    records = _load_records(dataset, data_dir)
    by_uid = {r.uid: r for r in records}
    rows = store.samples()
    protocol = store.protocol
    labelled: list[Any] = []
    empty = 0
    if protocol == "generated":
        style = dataset.get("prompt_style") or "plain"
        for row in rows:
            rec = by_uid.get(row["uid"])
            if rec is None:
                raise ValueError(
                    f"uid {row['uid']!r} of the store is not among the reloaded records; check --data-dir."
                )
            if "answer" not in row:
                raise ValueError(
                    "The generated-protocol store has no 'answer' metadata; re-extract it with this version."
                )
            if not str(row["answer"]).strip():
                empty += 1  # the model answered nothing: no answer token for any detector to score
                continue
            prompt = data.generation_prompt(rec, style=style, tokenizer=tokenizer)
            completion = generated_completion(row.get("raw_answer"), str(row["answer"]))
            labelled.append(
                data.LabeledExample(
                    rec.uid, rec.task, prompt, row["answer"], row["label"], "generated", completion=completion
                )
            )
        if empty:
            import sys

            print(
                f"examples_from_store: left out {empty} empty generated answers (nothing to score or judge).",
                file=sys.stderr,
            )
    else:
        made = data.paired_examples(records) if protocol == "paired" else data.natural_examples(records)
        by_key = {(e.uid, e.source): e for e in made}
        for row in rows:
            ex = by_key.get((row["uid"], row.get("source")))
            if ex is None or int(ex.label) != int(row["label"]):
                raise ValueError(
                    f"Store sample {row['uid']!r} ({row.get('source')}) does not match the reloaded records."
                )
            labelled.append(ex)
    return scored_examples(tokenizer, labelled)
