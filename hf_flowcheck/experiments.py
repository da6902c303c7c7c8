"""Train and evaluate a flow validator on an extracted feature store (``flowcheck train/evaluate``).

Protocol (``evaluation.md``): seeded 70/10/20 splits grouped by source record; the validation
split alone chooses the checkpoint; the test split is scored once, with 95% bootstrap intervals.
Paired stores are also reported with the length-only baseline and on the length-matched subset.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.evaluation import evaluate_scores, format_table, length_baseline, length_matched_indices
from hf_flowcheck.store import FeatureStore

SPLIT_NAMES = ("train", "validation", "test")


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
) -> dict[str, Any]:
    """Score one split of a store and compute every metric (plus length controls for paired stores).

    Returns:
        ``{"rows": {name: result, ...}, "n": int, "protocol": str}`` where each result is
        :func:`~hf_flowcheck.evaluation.evaluate_scores` output.
    """
    feats, labels, uids = store.load(split_uids)
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
        from hf_flowcheck.evaluation import token_counter

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


def train_from_store(
    features_dir: str | Path,
    out_dir: str | Path,
    *,
    split_seed: int = 0,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 32,
    patience: int = 5,
    seed: int = 0,
    pooling: str = "max",
    input_transform: str = "log_standardize",
    event_layernorm: bool = True,
    n_bootstrap: int = 1000,
    command: str | None = None,
    progress: bool = True,
    device: str | None = None,
    drop_uids: Iterable[str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train a validator on a store's train split, select on validation, report on test, save.

    ``drop_uids`` leaves those records out of every split *after* splitting all of the store's
    uids, so the remaining records keep the split they have without the drop (for comparing two
    stores of the same answers on exactly the same records).

    ``device`` (e.g. ``"cuda"``) is where the GRU trains; the saved and returned validator is on CPU.

    Returns:
        ``(validator, report)``; the validator folder (``config.json``, ``model.safetensors``,
        ``README.md`` with the test table and ``command``) is written to ``out_dir``.
    """
    from hf_flowcheck.detectors.flow_validator import ValidatorConfig
    from hf_flowcheck.training import train_validator

    store = FeatureStore.open(features_dir)
    _, _, all_uids = store.load()
    split = split_records(all_uids, seed=split_seed)
    if drop_uids is not None:
        split = split.without(drop_uids)
    parts = {name: store.load(getattr(split, name)) for name in SPLIT_NAMES}
    train_f, train_y, _ = parts["train"]
    val_f, val_y, _ = parts["validation"]
    vcfg = ValidatorConfig.from_feature_names(
        train_f.names, pooling=pooling, input_transform=input_transform, event_layernorm=event_layernorm
    )
    validator, history = train_validator(
        train_f,
        train_y,
        val_f,
        val_y,
        config=vcfg,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
        checkpoint_dir=Path(out_dir) / "checkpoints",
        progress=progress,
        flow_config=store.config,
        command=command,
        device=device,
    )
    validator = validator.to("cpu")
    fingerprint = dict(store.model_fingerprint) if store.model_fingerprint else None
    if fingerprint:
        from hf_flowcheck.hub import _upstream_id

        fingerprint["base_id"] = _upstream_id(fingerprint.get("base_id"))
    validator.base_fingerprint = fingerprint
    report = evaluate_validator_on_store(validator, store, split.test, n_bootstrap=n_bootstrap)
    report["split"] = {
        "seed": split_seed,
        **{name: len(parts[name][1]) for name in SPLIT_NAMES},
        "test_label_1": int(parts["test"][1].sum()),
    }
    report["history"] = history.to_dict()
    report["features"] = str(features_dir)
    validator.training_metadata["split"] = report["split"]
    validator.training_metadata["features_manifest"] = {
        "protocol": store.protocol,
        "dataset": store.manifest.get("dataset") if hasattr(store, "manifest") else None,
        "counts": store.counts,
    }
    validator.record_evaluation(report["rows"], command=command)
    out = Path(out_dir)
    validator.save_pretrained(out)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float))
    return validator, report


def cmd_train(args: argparse.Namespace) -> int:
    command = (
        "flowcheck " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if args.command_text is None
        else (args.command_text)
    )
    try:
        _, report = train_from_store(
            args.features,
            args.out,
            split_seed=args.split_seed,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            patience=args.patience,
            seed=args.seed,
            pooling=args.pooling,
            input_transform=args.input_transform,
            event_layernorm=args.event_layernorm,
            n_bootstrap=args.bootstrap,
            command=command,
            progress=not args.no_progress,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"flowcheck train: error: {err}", file=sys.stderr)
        return 2
    print(f"Split (seed {report['split']['seed']}): " + ", ".join(f"{k} {report['split'][k]}" for k in SPLIT_NAMES))
    h = report["history"]
    print(f"Best validation AUROC {h['best_val_auroc']:.3f} at epoch {h['best_epoch']}; test results:")
    print(format_table(report["rows"]))
    print(f"Saved the validator to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hf_flowcheck.detectors.flow_validator import FlowValidator

    try:
        validator = FlowValidator.from_pretrained(args.validator)
        store = FeatureStore.open(args.features)
        _, _, uids = store.load()
        split = split_records(uids, seed=args.split_seed)
        which = None if args.split == "all" else getattr(split, args.split)
        report = evaluate_validator_on_store(validator, store, which, n_bootstrap=args.bootstrap)
    except (ValueError, FileNotFoundError) as err:
        print(f"flowcheck evaluate: error: {err}", file=sys.stderr)
        return 2
    report["split"] = args.split
    print(f"{args.split} split of {args.features}: {report['n']} samples ({report['protocol']} protocol)")
    print(format_table(report["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        print(f"Wrote {args.json}")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="Feature store written by `flowcheck extract`.")
    p.add_argument("--out", required=True, help="Folder for the trained validator.")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=5, help="Early stopping on validation AUROC.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pooling", choices=["max", "logsumexp"], default="max")
    p.add_argument(
        "--input-transform",
        choices=["log_standardize", "standardize", "none"],
        default="log_standardize",
        help="Per-feature input scaling before the LayerNorm ('none' = the spec's B.9 exactly).",
    )
    p.add_argument(
        "--event-layernorm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LayerNorm across one event's features (spec B.9; on). Off keeps the event's common magnitude.",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the 95%% intervals.")
    p.add_argument("--device", default=None, help="Where the validator trains (e.g. cuda); default cpu.")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--command-text", default=None, help=argparse.SUPPRESS)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--validator", required=True, help="Validator folder or Hub id.")
    p.add_argument("--features", required=True, help="Feature store written by `flowcheck extract`.")
    p.add_argument("--split", choices=["train", "validation", "test", "all"], default="test")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", default=None, help="Also write the results as JSON here.")
