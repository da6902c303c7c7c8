"""Train and evaluate a flow validator on an extracted feature store (``flowcheck train/evaluate``).

Protocol (``evaluation.md``): seeded 70/10/20 splits grouped by source record; the validation
split alone chooses the checkpoint; the test split is scored once, with 95% bootstrap intervals.
Paired stores are also reported with the length-only baseline and on the length-matched subset.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_flowcheck.data.splits import SPLIT_NAMES, split_records
from hf_flowcheck.metrics import (
    evaluate_scores,
    expected_calibration_error,
    fit_platt,
    length_baseline,
    length_matched_indices,
)
from hf_flowcheck.workflows.store import FeatureStore
from hf_flowcheck.workflows.train_config import TrainConfig

__all__ = [
    "MIN_PER_CLASS",
    "calibrate_validator",
    "evaluate_validator_on_store",
    "operating_points",
    "train_from_store",
]


def _answers(store: FeatureStore, uids: list[str], labels: torch.Tensor) -> list[str] | None:
    """Answer texts aligned with ``store.load()`` order, when the store kept them."""
    rows = store.samples()
    if not rows or "answer" not in rows[0]:
        return None
    by_key = {(r["uid"], int(r["label"])): r["answer"] for r in rows}
    try:
        return [by_key[(u, int(y))] for u, y in zip(uids, labels.tolist())]
    except KeyError:
        return None


def evaluate_validator_on_store(
    validator: Any,
    store: FeatureStore,
    split_uids: list[str] | None,
    *,
    name: str = "flow validator",
    n_bootstrap: int = 1000,
    seed: int = 0,
    tokenizer: Any = None,
    channels: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Score one split of a store and compute every metric (plus length controls for paired stores).

    Returns:
        ``{"rows": {name: result, ...}, "n": int, "protocol": str}`` where each result is
        :func:`~hf_flowcheck.metrics.evaluate_scores` output.
    """
    from hf_flowcheck.fingerprint import CHECKED_FIELDS

    mine, theirs = getattr(validator, "base_fingerprint", None) or {}, store.model_fingerprint or {}
    if not mine or not theirs:
        raise ValueError(
            f"The {'validator' if not mine else 'feature store'} records no base-model fingerprint, so nothing "
            "shows the two come from the same model; re-save it with its fingerprint (flowcheck train does)."
        )
    diff = [k for k in CHECKED_FIELDS if mine.get(k) != theirs.get(k)]
    if diff:
        raise ValueError(
            f"The validator was trained on another model than the store's features ({', '.join(diff)} differ: "
            f"{mine.get('base_id')!r} vs {theirs.get('base_id')!r}); evaluate it on features of its own base model."
        )
    v_cfg = getattr(validator, "flow_config", None)
    if v_cfg is not None:
        # The lens and state groups are extra channels: a store with them also serves validators without them.
        as_store = dataclasses.replace(
            store.config, lens_features=v_cfg.lens_features, state_summary=v_cfg.state_summary
        )
        missing_group = (v_cfg.lens_features and not store.config.lens_features) or (
            v_cfg.state_summary != "none" and v_cfg.state_summary != store.config.state_summary
        )
        if as_store != v_cfg or missing_group:
            a, b = dataclasses.asdict(v_cfg), dataclasses.asdict(store.config)
            what = "; ".join(f"{k}: validator {a[k]!r}, store {b[k]!r}" for k in a if a[k] != b[k])
            raise ValueError(
                f"The store's features were extracted with another FlowConfig than the validator's ({what}); "
                "re-extract them with the validator's flow_config."
            )
    feats, labels, uids = store.load(split_uids)
    wanted = tuple(getattr(getattr(validator, "config", None), "feature_names", ()) or ())
    if channels is None and wanted and set(wanted) < set(feats.names):
        channels = wanted  # a lens/state store scores its flow-only validators too
    feats = _select_channels(feats, channels)
    if len(labels) == 0:
        raise ValueError("The evaluation split is empty; extract more samples or check the split seed.")
    out = validator.score_features(feats)
    scores = out.scores.detach().cpu().numpy().astype(np.float64)
    ok = ~np.isnan(scores)
    y = labels.numpy()
    rows: dict[str, Any] = {}
    n_nan = int((~ok).sum())
    rows[name] = evaluate_scores(y[ok], scores[ok], name=name, n_bootstrap=n_bootstrap, seed=seed)
    report: dict[str, Any] = {"rows": rows, "n": int(ok.sum()), "n_without_events": n_nan, "protocol": store.protocol}
    if store.protocol == "paired":
        answers = _answers(store, uids, labels)
        from hf_flowcheck.metrics import token_counter

        count = token_counter(tokenizer)
        if answers is not None:
            rows["length-only (answer words)"] = length_baseline(
                answers, y, count_fn=count, n_bootstrap=n_bootstrap, seed=seed
            )
            idx = length_matched_indices(uids, answers, y.tolist(), count_fn=count, max_diff=2)
            idx = np.array([i for i in idx if ok[i]], dtype=int)
            report["length_matched_pairs"] = int(len(idx) // 2)
            if len(idx) >= 10 and len(set(y[idx].tolist())) == 2:
                rows["flow validator, length-matched subset"] = evaluate_scores(
                    y[idx], scores[idx], n_bootstrap=n_bootstrap, seed=seed
                )
                rows["length-only, length-matched subset"] = length_baseline(
                    [answers[i] for i in idx], y[idx], count_fn=count, n_bootstrap=n_bootstrap, seed=seed
                )
    return report


MIN_PER_CLASS = 20
"""Fewest training answers of each class :func:`train_from_store` accepts."""


def _select_channels(feats: Any, channels: tuple[str, ...] | None) -> Any:
    return feats.select(channels) if channels else feats


def _probe_layer(train_f: Any, train_y: torch.Tensor, val_f: Any, val_y: torch.Tensor) -> int:
    """The residual boundary where a logistic probe is best on validation (the state branch reads it)."""
    from hf_flowcheck.detectors.baselines import HiddenStateProbe

    if train_f.states is None:
        raise ValueError(
            "--state needs state summaries in the store; extract with FlowConfig(state_summary='last') (or "
            "'token_confidence' for the flow + confidence design)."
        )
    probe = HiddenStateProbe(kind="logistic").fit(train_f.states, train_y.numpy(), val_f.states, val_y.numpy())
    return int(probe.layer)


def calibrate_validator(
    validator: Any, features: Any, labels: Any, *, split: str = "validation", groups: Any = None
) -> dict:
    """Fit the validator's logit map on held-out answers (Platt scaling), then its operating points.

    Training weights the classes equally, so raw scores centre on the balanced point, not on how
    often the answers of the training mix were wrong. Calibration makes ``score`` the observed
    hallucination rate *of answers like the calibration split's* (a different mix of prompts or a
    different base rate moves it); the ranking and the culprit do not change. The
    ``"recommended"`` thresholds (:func:`operating_points`) are then chosen on the calibrated scores.

    Args:
        validator: A :class:`~hf_flowcheck.detectors.FlowValidator` (its map is reset first).
        features: The calibration answers' :class:`~hf_flowcheck.FlowFeatures` (the validation split).
        labels: ``[N]`` 0/1 labels.
        split: Name of the split, recorded in ``training_metadata``.
        groups: Optional ``[N]`` group name of each answer (its prompt style): the operating points
            are also chosen within each group with at least 20 answers of both labels
            (``training_metadata["operating_points_by_group"]``), for users whose prompts are all of one kind.

    Returns:
        ``training_metadata["calibration"]``: ``{"method", "chosen_on", "n", "scale", "bias", "ece_before",
        "ece_after"}``, or ``{"skipped": reason}`` when the fit is not possible (one class, or a
        validator that ranks the split the wrong way round: the map stays the identity).
    """
    validator.set_calibration(1.0, 0.0)
    all_y = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    raw = validator.score_features(features).logits.double().cpu().numpy()  # nan: no events
    ok = np.isfinite(raw)
    y, logits = all_y[ok], raw[ok]
    info: dict[str, Any]
    if y.size < 2 or y.min() == y.max():
        info = {"skipped": f"the {split} split has {y.size} scored answers of one class; no calibration fitted"}
    else:
        scale, bias = fit_platt(logits, y)
        if scale <= 0:
            why = f"on the {split} split the validator ranks the wrong way round (Platt scale {scale:.3f})"
            info = {"skipped": why}
        else:
            validator.set_calibration(scale, bias)
            scale, bias = validator.calibration  # as stored (float32), so the record is what scores use
            after = 1.0 / (1.0 + np.exp(-(scale * logits + bias)))
            info = {
                "method": "platt",
                "chosen_on": split,
                "n": int(y.size),
                "hallucinated_share": round(float(y.mean()), 4),
                "scale": scale,
                "bias": bias,
                "ece_before": round(expected_calibration_error(y, 1.0 / (1.0 + np.exp(-logits))), 4),
                "ece_after": round(expected_calibration_error(y, after), 4),
            }
    validator.training_metadata["calibration"] = info
    a, b = validator.calibration  # the map now in force (the identity when skipped): no second pass
    scores = 1.0 / (1.0 + np.exp(-(a * raw + b)))
    keep = ~np.isnan(scores)
    validator.training_metadata["operating_points"] = {"chosen_on": split, **_points(all_y[keep], scores[keep])}
    if groups is not None:
        names = np.asarray(groups, dtype=object)
        by_group = {}
        for g in sorted(set(names[keep].tolist())):
            m = keep & (names == g)
            if m.sum() >= 20 and 0 < all_y[m].sum() < m.sum():
                by_group[str(g)] = {"n": int(m.sum()), **_points(all_y[m], scores[m])}
        validator.training_metadata["operating_points_by_group"] = by_group
    return info


def _points(labels: np.ndarray, scores: np.ndarray) -> dict:
    """The stored operating points: flag at precision 0.8 / 0.9; answer at risk 0.1 / 0.2."""
    return {**operating_points(labels, scores), **operating_points(labels, scores, precision=0.9, risk=0.2)}


def operating_points(labels: np.ndarray, scores: np.ndarray, *, precision: float = 0.8, risk: float = 0.1) -> dict:
    """Thresholds chosen on validation scores: flag at precision >= ``precision``; answer at risk <= ``risk``.

    Returns:
        ``{"precision_0.8": {"threshold", "precision", "recall"}, "risk_0.1": {"threshold", "risk",
        "coverage"}}``; a threshold is ``None`` where no cut reaches the target.
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    prec = tp / np.arange(1, len(y) + 1)
    rec = tp / max(1, int(y.sum()))
    ok = np.nonzero(prec >= precision)[0]
    flag = None
    if ok.size:
        i = int(ok[np.argmax(rec[ok])])
        flag = {"threshold": float(s[i]), "precision": float(prec[i]), "recall": float(rec[i])}
    # answer (do not abstain) when score < t: risk = hallucinated share among kept answers
    asc = np.argsort(scores, kind="stable")
    sa, ya = scores[asc], labels[asc]
    risk_k = np.cumsum(ya) / np.arange(1, len(ya) + 1)
    ok = np.nonzero(risk_k <= risk)[0]
    keep = None
    if ok.size:
        i = int(ok.max())
        nxt = float(sa[i + 1]) if i + 1 < len(sa) else float(sa[i]) + 1e-6
        keep = {"threshold": (float(sa[i]) + nxt) / 2, "risk": float(risk_k[i]), "coverage": (i + 1) / len(ya)}
    return {f"precision_{precision}": flag, f"risk_{risk}": keep}


def _plot_learning_curve(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = np.arange(1, len(history["train_loss"]) + 1)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, history["train_loss"], label="train loss")
    ax[0].plot(ep, history["val_loss"], label="validation loss")
    w = float(history.get("pos_weight") or 1.0)
    # With the class weight n_neg/n_pos the best constant predictor is p = 0.5: loss 2 (n_neg/N) ln 2.
    ax[0].axhline(2 * w / (1 + w) * np.log(2), color="grey", ls="--", lw=1, label="constant predictor")
    ax[1].plot(ep, history["val_auroc"], label="validation AUROC", color="C2")
    for a in ax:
        a.axvline(history["best_epoch"], color="grey", ls=":", lw=1)
        a.set_xlabel("epoch")
        a.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _store_token_labels(store: Any, feats: Any, uids: list[str], labels: Any, tokenizer: Any, rule: str) -> Any:
    """Weak token labels of a replayed store's rows, from its committed answers file."""
    from hf_flowcheck.workflows.answers import read_answers
    from hf_flowcheck.workflows.token_labels import reference_token_labels

    if tokenizer is None:
        raise ValueError("token_loss_weight > 0 needs the model's tokenizer (flowcheck train --model NAME).")
    path = (store.manifest.get("dataset") or {}).get("answers")
    if not path or not Path(path).is_file():
        raise ValueError(
            f"token_loss_weight > 0 reads the token labels from the answers file a replayed store names, but this "
            f"store names {path!r}, which is not here; replay a committed answers file (flowcheck replay), or set "
            "token_loss_weight to 0."
        )
    records = {r.uid: r for r in read_answers(path).records}
    return reference_token_labels(feats, uids, records, tokenizer, labels, rule=rule)


#: The :class:`TrainConfig` fields that shape the network (passed on to ``ValidatorConfig``).
_VALIDATOR_FIELDS = (
    "pooling", "input_transform", "event_layernorm", "head", "members", "block_embedding", "hidden", "embed",
    "gru_hidden", "dropout",
)  # fmt: skip


def train_from_store(
    features_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    tokenizer: Any = None,
    command: str | None = None,
    progress: bool = True,
    device: str | None = None,
    drop_uids: Iterable[str] | None = None,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Train a validator on a store's train split, select on validation, report on test, save.

    ``features_dir`` is a feature store or a root of replayed part stores. ``config`` is the recipe
    (:class:`~hf_flowcheck.workflows.train_config.TrainConfig`, its defaults when omitted); keyword
    ``options`` override its fields (``train_from_store(d, out, head="attention")``), and an unknown
    one is a ``ValueError`` naming the known ones. ``state=True`` adds the state branch, reading the
    residual boundary where a hidden-state probe is best on validation (or a token-confidence
    store's ``[N, 1, 3]`` states); ``state_init="probe"`` starts it at that probe and
    ``prefix_augment`` trains on random answer prefixes too, for streaming (see
    :func:`train_validator`). ``token_loss_weight > 0`` (a replayed store; needs the model's
    ``tokenizer``) adds the token loss on the weak labels of
    :func:`~hf_flowcheck.workflows.token_labels.reference_token_labels`, read from the store's
    committed answers file. ``channels`` keeps only those feature channels (e.g. the flow-only
    variant of a lens store). The folder also gets ``learning_curve.json``/``.png`` and
    validation-chosen operating points; the validator records the config
    (``training_metadata["train_config"]``).

    ``drop_uids`` leaves those records out of every split *after* splitting all of the store's
    uids, so the remaining records keep the split they have without the drop (for comparing two
    stores of the same answers on exactly the same records).

    ``device`` (e.g. ``"cuda"``) is where the GRU trains; the saved and returned validator is on CPU.

    Returns:
        ``(validator, report)``; the validator folder (``config.json``, ``model.safetensors``,
        ``README.md`` with the test table and ``command``) is written to ``out_dir``.
    """
    cfg = TrainConfig.with_options(config, options)
    from hf_flowcheck.detectors.flow_validator import ValidatorConfig
    from hf_flowcheck.workflows.replay import open_features
    from hf_flowcheck.workflows.training import train_validator

    store = open_features(features_dir)
    all_uids = store.uids()
    split = split_records(all_uids, seed=cfg.split_seed)
    if drop_uids is not None:
        split = split.without(drop_uids)
    parts = {name: store.load(getattr(split, name)) for name in SPLIT_NAMES}
    train_f, train_y, train_uids = parts["train"]
    val_f, val_y, _ = parts["validation"]
    token_labels = None
    if cfg.token_loss_weight:
        token_labels = _store_token_labels(store, train_f, train_uids, train_y, tokenizer, cfg.token_label_rule)
    n_pos, n_neg = int(train_y.sum()), int((train_y == 0).sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        raise ValueError(
            f"The train split of {features_dir} holds {n_neg} correct and {n_pos} hallucinated answers; training "
            f"needs at least {MIN_PER_CLASS} of each. Extract more answers (or a dataset where the model is wrong "
            "and right more evenly)."
        )
    train_f, val_f = _select_channels(train_f, cfg.channels), _select_channels(val_f, cfg.channels)
    extra: dict[str, Any] = {}
    if cfg.input_transform == "block_log_standardize" or cfg.block_embedding:
        extra["num_blocks"] = train_f.num_blocks
    if cfg.state:
        extra.update(state_dim=int(train_f.states.shape[-1]) if train_f.states is not None else 0)
        layer = _probe_layer(train_f, train_y, val_f, val_y)
        n_bound = int(train_f.states.shape[1])
        spread = cfg.state_spread
        around = {layer} if not spread else {layer - spread, layer, layer + spread}
        extra["state_blocks"] = tuple(sorted(min(max(b, 0), n_bound - 1) for b in around))
    vcfg = ValidatorConfig.from_feature_names(
        train_f.names,
        **{name: getattr(cfg, name) for name in _VALIDATOR_FIELDS},
        **extra,
    )
    flow_config = store.config
    if cfg.channels:
        lens = any(c.startswith("lens_") for c in cfg.channels)
        flow_config = dataclasses.replace(flow_config, lens_features=lens)
    if not cfg.state and flow_config.state_summary != "none":
        flow_config = dataclasses.replace(flow_config, state_summary="none")  # the validator does not read them
    validator, history = train_validator(
        train_f,
        train_y,
        val_f,
        val_y,
        config=vcfg,
        train_config=cfg,
        token_labels=token_labels,
        checkpoint_dir=Path(out_dir) / "checkpoints",
        progress=progress,
        flow_config=flow_config,
        **({"device": device} if device is not None else {}),  # else train_config's
    )
    validator = validator.to("cpu")
    fingerprint = dict(store.model_fingerprint) if store.model_fingerprint else None
    if fingerprint:
        from hf_flowcheck.fingerprint import _upstream_id

        fingerprint["base_id"] = _upstream_id(fingerprint.get("base_id"))
    validator.base_fingerprint = fingerprint
    calibrate_validator(validator, val_f, val_y)
    report = evaluate_validator_on_store(
        validator, store, split.test, n_bootstrap=cfg.n_bootstrap, channels=cfg.channels
    )
    report["split"] = {
        "seed": cfg.split_seed,
        **{name: len(parts[name][1]) for name in SPLIT_NAMES},
        "test_label_1": int(parts["test"][1].sum()),
    }
    report["history"] = history.to_dict()
    report["features"] = str(features_dir)
    validator.training_metadata["split"] = report["split"]
    validator.training_metadata["train_config"] = cfg.to_dict()
    validator.training_metadata["features_manifest"] = {
        "protocol": store.protocol,
        "dataset": store.manifest.get("dataset") if hasattr(store, "manifest") else None,
        "counts": store.counts,
    }
    validator.record_evaluation(report["rows"], command=command)
    out = Path(out_dir)
    validator.save_pretrained(out)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float))
    hist = history.to_dict()
    (out / "learning_curve.json").write_text(json.dumps(hist, indent=2, default=float))
    _plot_learning_curve(hist, out / "learning_curve.png")
    return validator, report
