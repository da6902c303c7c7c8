"""Transfer of a flow validator across prompt styles and tasks of the robustness corpus.

Two steps, both resumable:

``replay``  teacher-forces every labelled corpus answer (its primary view: chat answers whole,
            plain ones up to their answer line) into one feature store per (task, style) cell,
            with the bundled validator's flow recipe (its ten flow features, no lens channels) and the new
            default ``score_terminators=False``;
            also records each answer's token confidence (-mean / -min log p, mean entropy) from the
            same model, and the three answer ends of each answer for the terminator check.
``confidence`` the token-confidence channel of every labelled answer as the runtime computes it
            (``FlowConfig(state_summary='token_confidence')``: the content tokens only, read from the
            final residual at each token's predicting position), one forward per batch, into
            ``token_confidence.json`` per cell: what the ``flow+token-confidence`` design reads.
``matrix``  leave-one-out: for each prompt style (and each task) held out, train the bundled design
            on the other cells (a grouped 85/15 train/validation split for early stopping) and keep
            its scores; plus a grouped in-distribution split for reference (not used to choose).
``report``  every held-out cell: AUROC with 95% bootstrap intervals beside -mean log p, -min log p,
            mean entropy, answer length, the shipped validator and lm-polygraph's estimators
            (``benchmarks/polygraph_baselines.py``); the share of scores >= 0.99 and <= 0.01.

Commands (see docs/results.md, "Transfer across prompt styles and tasks"):

    python benchmarks/corpus_transfer.py replay --model SmolLM2-135M-Instruct \
        --corpus answers/SmolLM2-135M-Instruct/corpus --features runs/corpus-feats/smol
    python benchmarks/corpus_transfer.py matrix --model SmolLM2-135M-Instruct \
        --features runs/corpus-feats/smol --scores runs/corpus-feats/smol-matrix.json
    python benchmarks/corpus_transfer.py report --features runs/corpus-feats/smol \
        --scores runs/corpus-feats/smol-matrix.json --out benchmarks/results/corpus_transfer_smol.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_flowcheck.bundled import bundled_validators
from hf_flowcheck.data.corpus import CORPUS_TASKS, PROMPT_STYLES
from hf_flowcheck.detectors.base import ScoredExample, encode_text
from hf_flowcheck.detectors.baselines import HiddenStateProbe, token_confidence_features, train_logistic_regression
from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig
from hf_flowcheck.metrics import (
    auroc,
    bootstrap_ci,
    expected_calibration_error,
    paired_auroc_difference,
    rankdata_average,
)
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.corpus import answer_view, read_corpus
from hf_flowcheck.workflows.experiments import calibrate_validator, operating_points
from hf_flowcheck.workflows.extract import extract_dataset
from hf_flowcheck.workflows.store import FeatureStore, pad_features
from hf_flowcheck.workflows.training import train_validator

BUNDLED = {
    "SmolLM2-135M-Instruct": "smollm2-135m-instruct-halueval-qa",
    "Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder-0.5b-instruct-halueval-qa",
}
DESIGNS = (
    "shipped", "flow-only", "probe", "flow+confidence", "flow+token-confidence", "confidence", "flow+mean-state"
)  # fmt: skip
#: What the bundled validator of each design reads (its model card says it).
DESIGN_TEXT = {
    "flow-only": "It reads the flow signatures of the answer's tokens (the paper's ten features per token and block).",
    "flow+token-confidence": (
        "It reads the flow signatures of the answer's tokens (the paper's ten features per token and block) and "
        "the answer's token confidence (-mean log p, -min log p and mean entropy of the model's own next-token "
        "distributions over the answer's content tokens): a logistic regression on the confidence, kept frozen, "
        "plus what the flow part learns on top of it."
    ),
    "flow+mean-state": (
        "It reads the flow signatures of the answer's tokens (the paper's ten features per token and block) and "
        "the residual state entering one block, averaged over the answer's content tokens: a logistic regression "
        "on that state (the probe), kept frozen, plus what the flow part learns on top of it."
    ),
}
#: Designs whose state input is a token-confidence triple, and where ``load_cells``' meta holds it.
CONFIDENCE_DESIGNS = {"flow+confidence": slice(3, 6), "confidence": slice(3, 6), "flow+token-confidence": 8}


def shipped(model_name: str) -> FlowValidator:
    return FlowValidator.from_pretrained(bundled_validators()[BUNDLED[model_name]])


def sibling_figure(model_name: str) -> str:
    """The HaluEval-trained sibling's name and its recorded test AUROC (from its own training record)."""
    ref = shipped(model_name)
    auc = ref.training_metadata["evaluation"]["flow validator"]["metrics"]["auroc"]["value"]
    return f"`{BUNDLED[model_name]}`, trained on that format, reaches {auc:.3f} on its whole test split"


def model_of(v: FlowValidator) -> str:
    """Which of the bundled models a validator was trained on (by its fingerprint's base id)."""
    base = str((v.base_fingerprint or {}).get("base_id") or "")
    for name in BUNDLED:
        if base.endswith(name):
            return name
    raise SystemExit(f"{base!r} is none of the bundled models {sorted(BUNDLED)}.")


def design_config(ref: FlowValidator, names: tuple[str, ...], **changes) -> ValidatorConfig:
    """The bundled validator's network shape on this store's feature channels (Qwen's HaluEval validator
    also reads lens channels, which the corpus stores leave out)."""
    cfg = ValidatorConfig.from_dict(ref.config.to_dict())
    return dataclasses.replace(cfg, feature_names=tuple(names), num_features=len(names), **changes)


def _parts(cell: Path) -> list[tuple[int, int, Path]]:
    """The fixed-range stores of one cell, ``items-SSSSS-EEEEE`` (answers ``[S, E)`` of the cell's views)."""
    out = []
    for p in cell.glob("items-*-*"):
        start, end = (int(x) for x in p.name.split("-")[1:3])
        out.append((start, end, p))
    return sorted(out)


def _complete(part: Path) -> bool:
    try:
        return json.loads((part / "manifest.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def _migrate(cell: Path) -> None:
    """A cell written as one store (before parts) becomes its first part."""
    if not (cell / "manifest.json").is_file():
        return
    n = json.loads((cell / "manifest.json").read_text())["plan"]["num_items"]
    part = cell / f"items-00000-{n:05d}"
    part.mkdir()
    for entry in cell.iterdir():
        if (
            entry != part
            and entry.name not in ("confidence.json", "polygraph.json")
            and not entry.name.startswith("items-")
        ):
            entry.rename(part / entry.name)


def replay(args: argparse.Namespace) -> int:
    """Teacher-force every labelled answer not replayed yet; a cell grows by fixed-range parts.

    ``--max-per-cell N`` replays only each cell's first ``N`` labelled answers (the files are in a
    seeded random order, so they are a sample); a later run with a larger ``N`` adds a part.
    ``--one-pass`` keeps the token-confidence channel as the store's state summary
    (``FlowConfig(state_summary='token_confidence')``, read from the same forward as the flow
    features) and writes ``confidence.json`` and ``token_confidence.json`` from it: one forward per
    answer instead of three, at the price of the hidden-state probe (no residual states) and of the
    baselines' definition (over the scored content tokens, as the runtime reads them).
    """
    model, tok = load_model(args.model)
    model.eval()
    ref = shipped(args.model)
    # The corpus designs read the paper's ten flow features; Qwen's HaluEval validator also reads the lens
    # channels, a full 152k-row readout per (token, block) that would make its replay about 20x slower.
    cfg = dataclasses.replace(
        ref.flow_config, score_terminators=False, lens_features=False, basis_solver=args.basis_solver
    )
    if args.one_pass and args.mean_state:
        raise SystemExit(
            "--one-pass keeps the token confidence as the store's states; --mean-state keeps the pooled state."
        )
    if args.one_pass:
        cfg = dataclasses.replace(cfg, state_summary="token_confidence")
    elif args.mean_state:  # what a flow+mean-state validator reads at run time (confidence.json by its own forward)
        cfg = dataclasses.replace(cfg, state_summary="mean")
    root = Path(args.features)
    for f in read_corpus(args.corpus, tasks=args.tasks):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        views = [v for r in f.labelled if (v := answer_view(r, "primary", tok)) is not None]
        views = views[: args.max_per_cell] if args.max_per_cell else views
        if not views:
            continue
        cell = root / task / style
        if cell.is_dir():
            _migrate(cell)
        t0 = time.perf_counter()
        parts = _parts(cell) if cell.is_dir() else []
        covered = max((e for _, e, _ in parts), default=0)
        ranges = [(s, e) for s, e, p in parts if not _complete(p)]
        if len(views) > covered:
            ranges.append((covered, len(views)))
        for start, end in ranges:
            extract_dataset(
                model, tok, views[start:end], cell / f"items-{start:05d}-{end:05d}", config=cfg,
                protocol="replayed", batch_size=8, shard_size=32, progress=False,
                dataset={"corpus": str(f.path), "view": "primary", "items": [start, end]},
            )  # fmt: skip
        if args.one_pass:
            _confidence_from_states(cell, {v.uid: len(v.gen_ids) for v in views})
        else:
            _confidence_by_forward(model, tok, cell, views)
        print(f"{task}/{style}: {len(views)} answers, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _confidence_by_forward(model, tok, cell: Path, views) -> None:
    """``confidence.json``: each answer's token confidence from its own forward (every answer token)."""
    conf_path = cell / "confidence.json"
    conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    todo = [v for v in views if v.uid not in conf]
    if todo:
        ex = [ScoredExample(encode_text(tok, v.prompt), list(v.gen_ids), v.label, v.uid) for v in todo]
        with torch.inference_mode():
            stats = token_confidence_features(model, ex, batch_size=8)
        for v, row in zip(todo, stats, strict=True):
            conf[v.uid] = [float(x) for x in row[:3]] + [len(v.gen_ids)]
        conf_path.write_text(json.dumps(conf))


def _confidence_from_states(cell: Path, lengths: dict[str, int]) -> None:
    """``confidence.json`` and ``token_confidence.json`` of a cell replayed with token-confidence states."""
    conf, tconf = {}, {}
    for _, _, part in _parts(cell):
        if not _complete(part):
            continue
        feats, _, uids = FeatureStore.open(part).load()
        for u, row in zip(uids, feats.states[:, 0].tolist(), strict=True):
            tconf[u] = [float(x) for x in row]
            conf[u] = tconf[u] + [lengths[u]]
    for name, data in (("token_confidence.json", tconf), ("confidence.json", conf)):
        tmp = cell / (name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(cell / name)


def confidence(args: argparse.Namespace) -> int:
    """``token_confidence.json`` per cell: the runtime's token-confidence channel of each labelled answer."""
    from hf_flowcheck.detectors.base import batch_examples
    from hf_flowcheck.extraction import FlowExtractor
    from hf_flowcheck.model_io import pad_token_id

    model, tok = load_model(args.model)
    model.eval()
    cfg = dataclasses.replace(
        shipped(args.model).flow_config, score_terminators=False, state_summary="token_confidence"
    )
    ext = FlowExtractor(model, cfg, tokenizer=tok)
    pad = pad_token_id(model, eos_fallback=True, default=0)
    for f in read_corpus(args.corpus, tasks=args.tasks):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        views = [v for r in f.labelled if (v := answer_view(r, "primary", tok)) is not None]
        cell = Path(args.features) / task / style
        path = cell / "token_confidence.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        todo = [v for v in views if v.uid not in done]
        if not args.all_answers:  # only what has flow features to train with
            replayed = {u for _, _, part in _parts(cell) if _complete(part) for u in FeatureStore.open(part).uids()}
            todo = [v for v in todo if v.uid in replayed]
        t0 = time.perf_counter()
        for i in range(0, len(todo), 8):
            batch = [
                ScoredExample(encode_text(tok, v.prompt), list(v.gen_ids), v.label, v.uid) for v in todo[i : i + 8]
            ]
            ids, att, resp = batch_examples(batch, pad)
            states = ext.token_confidence(ids, att, resp)
            for v, row in zip(todo[i : i + 8], states[:, 0].tolist(), strict=True):
                done[v.uid] = [float(x) for x in row]
        if todo:
            cell.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(done))
            tmp.replace(path)
        print(f"{task}/{style}: {len(todo)} new of {len(views)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


def load_cells(root: Path, *, features: bool = True) -> tuple:
    """Every complete part of every cell, in cell then range order: ``(features, labels, meta)``."""
    feats, labels, meta = [], [], []
    for cell in sorted(p for p in root.glob("*/*") if p.is_dir() and (p / "confidence.json").is_file()):
        _migrate(cell)
        conf = json.loads((cell / "confidence.json").read_text())
        poly_path = cell / "polygraph.json"
        poly = json.loads(poly_path.read_text()) if poly_path.is_file() else {}
        tc_path = cell / "token_confidence.json"
        tconf = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        for _, _, part in _parts(cell):
            if not _complete(part) or not set(FeatureStore.open(part).uids()) <= conf.keys():
                continue  # still being replayed (its confidence comes after its features)
            store = FeatureStore.open(part)
            if features:
                f, y, uids = store.load()
                feats.append(f)
                labels.append(y)
            else:
                uids = store.uids()
            for u in uids:
                meta.append((cell.parent.name, cell.name, u, *conf[u], poly.get(u, {}), tconf.get(u)))
    if not features:
        return None, None, meta
    return pad_features(feats), torch.cat(labels).numpy().astype(int), meta


def ci_row(y, s) -> dict:
    ok = ~np.isnan(s)
    y, s = y[ok], s[ok]
    if len(set(y.tolist())) < 2:
        return {"auroc": None, "n": len(y)}
    lo, hi = bootstrap_ci(auroc, y, s, n=500)
    return {"auroc": round(auroc(y, s), 3), "ci": [round(lo, 3), round(hi, 3)], "n": len(y), "pos": int(y.sum())}


def train_on(
    feats, y, idx, ref: FlowValidator, seed: int, epochs: int, design: str = "shipped", state_depth: int = 0,
    probe_states: tuple | None = None, state_l2: float = 1e-2,
) -> tuple:  # fmt: skip
    """Fit one design on ``idx`` (85/15 grouped train/validation); return its scores of every answer.

    ``shipped``: the bundled design (flow + frozen-probe state branch); ``flow-only``: its flow part;
    ``probe``: the hidden-state probe (logistic, layer chosen on validation) on the same answers'
    residual states. The validators are calibrated on the validation part (Platt) and carry its
    ``precision_0.8`` threshold; the probe's threshold is chosen on its validation scores the same way.

    Returns:
        ``(scores [N], threshold or None, calibration record)``.
    """
    rng = np.random.default_rng(seed)
    idx = rng.permutation(idx)
    n_val = max(20, len(idx) * 15 // 100)
    va, tr = idx[:n_val], idx[n_val:]
    if design == "confidence":  # the flow+confidence design's frozen term alone: the ablation of its flow part
        x = feats.states[:, 0].double()
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
        w, b = train_logistic_regression((x[tr] - mu) / sd, torch.as_tensor(y[tr]), l2=1e-2)
        scores = torch.sigmoid((x - mu) / sd @ w + b).numpy()
        point = operating_points(y[va], scores[va])["precision_0.8"]
        return scores, point and point["threshold"], {}
    if design == "probe":
        probe = HiddenStateProbe(layers="all").fit(feats.states[tr], y[tr], feats.states[va], y[va])
        scores = probe.score(feats.states)
        point = operating_points(y[va], scores[va])["precision_0.8"]
        return scores, point and point["threshold"], {"layer": probe.layer}
    cfg = design_config(ref, feats.names)
    state_init = "frozen-probe"
    if design == "flow-only":
        cfg = dataclasses.replace(cfg, state_dim=0, state_blocks=())
        state_init = "random"
    elif design in ("flow+confidence", "flow+token-confidence"):
        # feats.states holds the answer's token confidence (matrix() puts it there): the state branch's
        # linear term is a logistic regression on it, frozen, with the flow part trained as a residual.
        cfg = dataclasses.replace(cfg, state_dim=3, state_blocks=(0,))
    elif design == "flow+mean-state":  # matrix() put the pooled state at block state_depth
        cfg = dataclasses.replace(cfg, state_dim=feats.states.shape[-1], state_blocks=(state_depth,))
    more = {"state_l2": state_l2} if state_init != "random" else {}
    v, _ = train_validator(
        feats.take(tr), torch.as_tensor(y[tr]), feats.take(va), torch.as_tensor(y[va]), config=cfg,
        epochs=epochs, patience=5, state_init=state_init, seed=seed, progress=False,
        flow_config=dataclasses.replace(ref.flow_config, score_terminators=False), probe_states=probe_states, **more,
    )  # fmt: skip
    v.eval()
    cal = calibrate_validator(v, feats.take(va), y[va])
    point = v.training_metadata["operating_points"]["precision_0.8"]
    return (
        score(v, feats),
        point and point["threshold"],
        {**cal, "operating_points": v.training_metadata["operating_points"]},
    )


def with_confidence(feats, meta: list, design: str):
    """``feats`` with the design's token-confidence triple as its ``[N, 1, 3]`` states."""
    where = CONFIDENCE_DESIGNS[design]
    rows = [m[where] for m in meta]
    if any(r is None for r in rows):
        raise SystemExit("some answers have no token_confidence.json entry: run `corpus_transfer.py confidence` first.")
    return dataclasses.replace(feats, states=confidence_states(rows))


def confidence_states(conf: np.ndarray) -> torch.Tensor:
    """``[N, 3]`` (-mean log p, -min log p, mean entropy) -> ``[N, 1, 3]`` as the state branch reads them."""
    return torch.as_tensor(np.asarray(conf, dtype=np.float32))[:, None, :]


@functools.lru_cache(maxsize=1)
def _pooled_states(pooled: str) -> dict:
    """``pooled_state_probe.py extract``'s states, read once per run (with_mean_state and pooled_only share them)."""
    from pooled_state_probe import load as load_pooled  # a sibling benchmark

    return load_pooled(Path(pooled))


def with_mean_state(feats, meta: list, pooled: str, depth: int):
    """``feats`` with each answer's residual state entering block ``depth``, averaged over its content tokens.

    The states come from ``benchmarks/pooled_state_probe.py extract`` (the same token mask and the same
    residual as ``FlowConfig(state_summary='mean')`` reads at run time), as ``[N, depth + 1, d]`` (only
    block ``depth`` filled: the state branch reads no other). Returns ``(feats, has)``: ``has [N]`` marks
    the answers that were extracted; the others must stay out of training and testing.
    ``pooled=None``: the store's own states (``replay --mean-state``), all answers.
    """
    if pooled is None:
        if feats.states is None or feats.states.dim() != 3 or feats.states.shape[1] <= depth:
            raise SystemExit(
                "flow+mean-state needs the pooled states: pass --pooled <pooled_state_probe.py extract --out>, or "
                "replay the store with --mean-state."
            )
        return feats, np.ones(feats.states.shape[0], dtype=bool)
    data = _pooled_states(pooled)
    where = {k: i for i, k in enumerate(zip(data["task"], data["style"], data["uid"], strict=True))}
    rows = [where.get((m[0], m[1], m[2]), -1) for m in meta]
    has = np.array([r >= 0 for r in rows])
    states = torch.zeros(len(meta), depth + 1, data["mean"].shape[-1])
    take = torch.as_tensor([r for r in rows if r >= 0], dtype=torch.long)
    states[torch.as_tensor(np.flatnonzero(has)), depth] = data["mean"][take, depth].float()
    return dataclasses.replace(feats, states=states), has


def pooled_only(meta: list, pooled: str | None, depth: int) -> dict | None:
    """The pooled answers without flow features (not in ``meta``): more answers for the frozen probe.

    The probe needs thousands of answers (docs/results.md, the learning curve) and a pooled state costs
    one forward, a replay dozens; the flow part is trained on the replayed answers alone. Returns
    ``{"task", "style" [M] arrays, "states" [M, depth + 1, d] (block ``depth`` filled), "labels" [M]}``
    or ``None`` without ``--pooled``.
    """
    if pooled is None:
        return None
    data = _pooled_states(pooled)
    known = {(m[0], m[1], m[2]) for m in meta}
    rows = np.array([k not in known for k in zip(data["task"], data["style"], data["uid"], strict=True)])
    take = torch.as_tensor(np.flatnonzero(rows), dtype=torch.long)
    states = torch.zeros(len(take), depth + 1, data["mean"].shape[-1])
    states[:, depth] = data["mean"][take, depth].float()
    return {"task": data["task"][rows], "style": data["style"][rows], "states": states,
            "labels": data["labels"][take].numpy()}  # fmt: skip


def probe_extras(extras: dict | None, keep: np.ndarray) -> tuple | None:
    """``(states, labels)`` of the pooled-only answers in ``keep`` (a mask over them), for train_validator."""
    if extras is None or not keep.any():
        return None
    return extras["states"][torch.as_tensor(np.flatnonzero(keep))], extras["labels"][keep]


def score(v: FlowValidator, feats) -> np.ndarray:
    with torch.inference_mode():
        return v.score_features(feats).scores.float().cpu().numpy()


def reached(y: np.ndarray, s: np.ndarray, threshold: float, promised: float) -> dict:
    """What a validation-chosen flagging threshold does on held-out answers ``y``/``s`` (no nan)."""
    flagged = s >= threshold
    return {
        "threshold": round(float(threshold), 4),
        "promised_precision": promised,
        "flagged_share": round(float(flagged.mean()), 3),
        "precision": round(float(y[flagged].mean()), 3) if flagged.any() else None,
        "recall": round(float(flagged[y == 1].mean()), 3) if (y == 1).any() else None,
    }


def cell_report(
    y, scores: dict[str, np.ndarray], idx, threshold: float | None = None, points: dict | None = None
) -> dict:
    out = {name: ci_row(y[idx], s[idx]) for name, s in scores.items()}
    v = scores["validator"][idx]
    ok_v = ~np.isnan(v)
    for name in ("-mean log p", "-min log p", "length", "shipped", "polygraph RAUQ", "validator + -min log p"):
        if name in scores:
            ok = ~np.isnan(scores[name][idx]) & ok_v
            if len(set(y[idx][ok].tolist())) < 2:  # a baseline not computed for this model (all nan)
                continue
            lo, hi = paired_auroc_difference(y[idx][ok], v[ok], scores[name][idx][ok], n=500)
            out["validator"][f"minus {name}"] = [round(lo, 3), round(hi, 3)]
    if "validator + -min log p" in scores:
        ok = ok_v & ~np.isnan(scores["-min log p"][idx])
        lo, hi = paired_auroc_difference(
            y[idx][ok], scores["validator + -min log p"][idx][ok], scores["-min log p"][idx][ok], n=500
        )
        out["validator + -min log p"]["minus -min log p"] = [round(lo, 3), round(hi, 3)]
    yv, sv = y[idx][ok_v], v[ok_v]
    out["validator"]["share_ge_0.99"] = round(float((sv >= 0.99).mean()), 3) if sv.size else None
    out["validator"]["share_le_0.01"] = round(float((sv <= 0.01).mean()), 3) if sv.size else None
    if sv.size:
        out["validator"]["ece"] = round(expected_calibration_error(yv, sv), 3)
        out["validator"]["mean_score"] = round(float(sv.mean()), 3)
        out["validator"]["hallucinated_share"] = round(float(yv.mean()), 3)
    if threshold is not None and sv.size:
        out["validator"]["recommended"] = reached(yv, sv, threshold, 0.8)
    high = (points or {}).get("precision_0.9")
    if high and sv.size:
        out["validator"]["precision_0.9_point"] = reached(yv, sv, high["threshold"], 0.9)
    s = scores["shipped"][idx]
    s = s[~np.isnan(s)]
    out["shipped"]["share_ge_0.99"] = round(float((s >= 0.99).mean()), 3) if s.size else None
    return out


def matrix(args: argparse.Namespace) -> int:
    """Train one validator per held-out style/task (and one in-distribution); keep their scores per answer."""
    feats, y, meta = load_cells(Path(args.features))
    task = np.array([m[0] for m in meta])
    style = np.array([m[1] for m in meta])
    ref = shipped(args.model)
    eval_only = [t for t, spec in CORPUS_TASKS.items() if spec.eval_only]
    trainable = ~np.isin(task, eval_only)
    reads = tuple(ref.config.feature_names) == tuple(feats.names) and (
        not ref.config.state_dim or (feats.states is not None and feats.states.shape[-1] == ref.config.state_dim)
    )
    # Qwen's HaluEval validator reads lens channels and residual states that a one-pass corpus store leaves out.
    shipped_scores = score(ref, feats) if reads else np.full(len(y), np.nan)
    out: dict = {"uids": [m[2] for m in meta], "labels": y.tolist(), "shipped": shipped_scores.tolist(),
                 "design": args.design, "runs": {}}  # fmt: skip
    if args.design in CONFIDENCE_DESIGNS:  # after the shipped validator read the residual states
        feats = with_confidence(feats, meta, args.design)
    has = np.ones(len(y), dtype=bool)
    extras = None
    if args.design == "flow+mean-state":
        feats, has = with_mean_state(feats, meta, args.pooled, args.state_depth)
        out["extracted"] = has.tolist()
        extras = pooled_only(meta, args.pooled, args.state_depth) if args.probe_all_pooled else None
    trainable_extra = None if extras is None else ~np.isin(extras["task"], eval_only)
    groups = [("style", s, style == s) for s in PROMPT_STYLES] if args.held_out != "tasks" else []
    if args.held_out != "styles":
        groups += [("task", t, task == t) for t in CORPUS_TASKS]
    for kind, name, held in groups:
        held = held & has
        if held.sum() < 20 or len(set(y[held].tolist())) < 2:
            continue
        t0 = time.perf_counter()
        train = np.flatnonzero(trainable & has & ~held)
        extra = None
        if extras is not None:  # the same held-out cell, from the pooled-only answers
            out_cell = extras["style"] == name if kind == "style" else extras["task"] == name
            extra = probe_extras(extras, trainable_extra & ~out_cell)
        sc, thr, cal = train_on(feats, y, train, ref, args.seed, args.epochs, args.design, args.state_depth,
                                extra, args.state_l2)  # fmt: skip
        out["runs"][f"{kind}={name}"] = {
            "test": np.flatnonzero(held).tolist(), "scores": sc.tolist(), "threshold": thr, "calibration": cal,
        }  # fmt: skip
        s = np.asarray(out["runs"][f"{kind}={name}"]["scores"])[held]
        print(f"{kind}={name}: n={int(held.sum())} auroc={auroc(y[held], s):.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
        Path(args.scores).write_text(json.dumps(out))
    if args.skip_in_distribution:
        return 0
    # In distribution, for reference only: a grouped random 70/30 split over every trainable cell.
    perm = np.random.default_rng(args.seed + 1).permutation(np.flatnonzero(trainable & has))
    cut = len(perm) * 7 // 10
    extra = probe_extras(extras, trainable_extra) if extras is not None else None
    sc, thr, cal = train_on(feats, y, perm[:cut], ref, args.seed, args.epochs, args.design, args.state_depth,
                            extra, args.state_l2)  # fmt: skip
    out["runs"]["in-distribution"] = {"test": perm[cut:].tolist(), "scores": sc.tolist(), "threshold": thr,
                                      "calibration": cal}  # fmt: skip
    Path(args.scores).write_text(json.dumps(out))
    return 0


def report(args: argparse.Namespace) -> int:
    """The tables: every held-out cell against every baseline (polygraph columns where they were run)."""
    feats_root = Path(args.features)
    data = json.loads(Path(args.scores[0]).read_text())
    for more in args.scores[1:]:  # matrices of the same answers split over processes (--held-out styles / tasks)
        other = json.loads(Path(more).read_text())
        if other["uids"] != data["uids"] or other["design"] != data["design"]:
            raise SystemExit(f"{more} holds other answers or another design than {args.scores[0]}.")
        data["runs"].update(other["runs"])
    y = np.asarray(data["labels"])
    _, _, meta = load_cells(feats_root, features=False)
    by_uid = {m[2]: m for m in meta}  # the stores may have grown since the matrix ran: its answers, its order
    meta = [by_uid[u] for u in data["uids"]]
    conf = np.array([m[3:7] for m in meta], dtype=float)
    base = {
        "-mean log p": conf[:, 0],
        "-min log p": conf[:, 1],
        "mean entropy": conf[:, 2],
        "length": conf[:, 3],
        "shipped": np.asarray(data["shipped"], dtype=float),
    }
    for name in sorted({k for m in meta for k in m[7]}):
        base[f"polygraph {name}"] = np.array([m[7].get(name, np.nan) for m in meta], dtype=float)
    results: dict = {"n": len(y), "hallucinated": int(y.sum()), "design": data.get("design"), "cells": {},
                     "command": "python benchmarks/corpus_transfer.py " + " ".join(sys.argv[1:])}  # fmt: skip
    for key, run in data["runs"].items():
        idx = np.asarray(run["test"])
        v = np.asarray(run["scores"], dtype=float)
        combo = np.full(len(y), np.nan)  # rank mean over the held-out cell: nothing fitted, no leakage
        ok = idx[~np.isnan(v[idx]) & ~np.isnan(base["-min log p"][idx])]
        combo[ok] = rankdata_average(v[ok]) + rankdata_average(base["-min log p"][ok])
        scores = {"validator": v, **base, "validator + -min log p": combo}
        points = (run.get("calibration") or {}).get("operating_points")
        results["cells"][key] = cell_report(y, scores, idx, run.get("threshold"), points)
    styles = [k for k in results["cells"] if k.startswith("style=")]
    results["mean_held_out_style_auroc"] = {
        name: _nan_mean([results["cells"][k][name]["auroc"] for k in styles])
        for name in ("validator", *base, "validator + -min log p")
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        reliability_png(y, data["runs"], base["shipped"], args.plot)
    cols = ["validator", "shipped", "-mean log p", "-min log p", "length"] + [k for k in base if k.startswith("poly")]
    print("| held out | n (halluc.) | " + " | ".join(cols) + " | validator >= 0.99 | shipped >= 0.99 |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    for key, cell in results["cells"].items():
        v = cell["validator"]
        row = [f"{cell[c]['auroc']:.3f}" if cell[c].get("auroc") is not None else "n/a" for c in cols]
        shares = [v["share_ge_0.99"], cell["shipped"]["share_ge_0.99"]]
        print(f"| {key} | {v['n']} ({v.get('pos', '?')}) | " + " | ".join(row) + " | "
              + " | ".join("n/a" if x is None else f"{x:.2f}" for x in shares) + " |")  # fmt: skip
    print("mean over held-out styles:", json.dumps(results["mean_held_out_style_auroc"]))
    return 0


def designs(args: argparse.Namespace) -> int:
    """Two matrices, cell by cell: each one's AUROC and their paired difference on the answers both tested.

    The matrices may come from two stores (e.g. one replayed to 20 answers per cell and one to 100):
    the answers are matched by uid within each held-out cell, so a design trained on more answers is
    compared with another on the same test answers.
    """
    a, b = (json.loads(Path(f).read_text()) for f in args.scores)
    for m, f in ((a, args.scores[0]), (b, args.scores[1])):
        if len(set(m["uids"])) != len(m["uids"]):
            raise SystemExit(f"{f} holds one uid twice; answers cannot be matched by uid.")
    names = [a["design"], b["design"]] if a["design"] != b["design"] else [f"{a['design']} (A)", f"{b['design']} (B)"]
    out: dict = {"designs": names, "scores": list(args.scores), "cells": {},
                 "command": "python benchmarks/corpus_transfer.py " + " ".join(sys.argv[1:])}  # fmt: skip
    print(f"| held out | n (halluc.) | {names[0]} | {names[1]} | paired difference (95%) |")
    print("|---|---|---|---|---|")
    for key in [k for k in a["runs"] if k in b["runs"]]:
        got = []
        for m in (a, b):
            run = m["runs"][key]
            got.append({m["uids"][i]: (float(run["scores"][i]), m["labels"][i]) for i in run["test"]})
        common = [u for u in got[0] if u in got[1]]
        if any(got[0][u][1] != got[1][u][1] for u in common):
            raise SystemExit(f"{key}: the two matrices label one answer differently.")
        common = [u for u in common if got[0][u][0] == got[0][u][0] and got[1][u][0] == got[1][u][0]]
        if not common:
            continue
        y = np.asarray([got[0][u][1] for u in common])
        sa, sb = (np.asarray([g[u][0] for u in common]) for g in got)
        lo, hi = paired_auroc_difference(y, sb, sa, n=1000)
        cell = {"n": len(common), "pos": int(y.sum()), names[0]: round(auroc(y, sa), 3),
                names[1]: round(auroc(y, sb), 3), "difference": [round(lo, 3), round(hi, 3)]}  # fmt: skip
        out["cells"][key] = cell
        print(f"| {key} | {cell['n']} ({cell['pos']}) | {cell[names[0]]:.3f} | {cell[names[1]]:.3f} | "
              f"[{lo:+.3f}, {hi:+.3f}] |")  # fmt: skip
    for kind in ("style", "task"):
        keys = [k for k in out["cells"] if k.startswith(kind + "=")]
        if keys:
            out[f"mean over held-out {kind}s"] = {
                d: round(float(np.mean([out["cells"][k][d] for k in keys])), 3) for d in out["designs"]
            }
            print(f"mean over held-out {kind}s:", json.dumps(out[f"mean over held-out {kind}s"]))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def _nan_mean(values) -> float | None:
    """Mean of the AUROCs that exist (``None`` where a baseline was not computed for this model)."""
    got = [v for v in values if v is not None]
    return round(float(np.mean(got)), 3) if got else None


def bundle(args: argparse.Namespace) -> int:
    """Train the chosen design on every trainable cell and save it as a bundled validator with its card.

    A seeded random 85/15 split of the answers (each record is answered once, so this is grouped by
    record) gives the validation answers that stop training, fit the calibration and choose the
    operating points, overall and per prompt style. The card carries the held-out transfer table of
    ``--report`` (the same design, trained without the held-out cell).
    """
    feats, y, meta = load_cells(Path(args.features))
    task = np.array([m[0] for m in meta])
    style = np.array([m[1] for m in meta])
    ref = shipped(args.model)
    eval_only = [t for t, spec in CORPUS_TASKS.items() if spec.eval_only]
    has = np.ones(len(y), dtype=bool)
    extra = None
    if args.design == "flow+mean-state":
        feats, has = with_mean_state(feats, meta, args.pooled, args.state_depth)
        extras = pooled_only(meta, args.pooled, args.state_depth) if args.probe_all_pooled else None
        extra = probe_extras(extras, ~np.isin(extras["task"], eval_only)) if extras is not None else None
    idx = np.random.default_rng(args.seed).permutation(np.flatnonzero(~np.isin(task, eval_only) & has))
    n_val = len(idx) * 15 // 100
    va, tr = idx[:n_val], idx[n_val:]
    if args.design == "flow+token-confidence":
        feats = with_confidence(feats, meta, args.design)
        cfg = design_config(ref, feats.names, state_dim=3, state_blocks=(0,))
        summary, state_init = "token_confidence", "frozen-probe"
    elif args.design == "flow+mean-state":
        cfg = design_config(ref, feats.names, state_dim=feats.states.shape[-1], state_blocks=(args.state_depth,))
        summary, state_init = "mean", "frozen-probe"
    else:
        cfg = design_config(ref, feats.names, state_dim=0, state_blocks=())
        summary, state_init = "none", "random"
    flow_config = dataclasses.replace(
        ref.flow_config, score_terminators=False, lens_features=False, state_summary=summary
    )
    command = "python benchmarks/corpus_transfer.py " + " ".join(sys.argv[1:])
    v, history = train_validator(
        feats.take(tr), torch.as_tensor(y[tr]), feats.take(va), torch.as_tensor(y[va]), config=cfg,
        epochs=args.epochs, patience=5, seed=args.seed, progress=False, flow_config=flow_config,
        state_init=state_init, probe_states=extra, **({"state_l2": args.state_l2} if state_init != "random" else {}),
    )  # fmt: skip
    v.eval()
    v.training_metadata["command"] = command
    v.base_fingerprint = dict(ref.base_fingerprint)
    cal = calibrate_validator(v, feats.take(va), y[va], groups=style[va])
    trained_tasks = sorted(set(task[tr].tolist()))
    v.training_metadata.update(
        prompt_styles=list(PROMPT_STYLES),
        tasks=trained_tasks,
        protocol="corpus (the model's own greedy answers; primary views; judged by the corpus rule)",
        split={"seed": args.seed, "train": len(tr), "validation": len(va), "validation_hallucinated": int(y[va].sum())},
        history=history.to_dict(),
        card_sections=_card_sections(args, y, style, task, tr, cal, extra, history.best_epoch),
    )
    v.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"saved {args.out}: trained on {len(tr)} answers, validated on {len(va)}; calibration {json.dumps(cal)}")
    return 0


def _card_sections(args, y, style, task, tr, cal, extra=None, best_epoch: int = -1) -> list[dict]:
    counts = "\n".join(
        f"| {st} | {int((style[tr] == st).sum())} | {int(y[tr][style[tr] == st].sum())} |" for st in PROMPT_STYLES
    )
    probe = ""
    if extra is not None:
        probe += (
            f" The probe was fitted on these answers and {len(extra[1])} more of the same cells whose pooled state "
            "was extracted without flow features (one forward each)."
        )
    if best_epoch == 0:
        probe += (
            " No epoch of the flow part beat the probe on validation, so the kept validator's score is the probe's: "
            "its event head is zero, and its culprit (token, block) carries no information."
        )
    sections = [
        {
            "title": "Intended use",
            "text": (
                f"Scoring {args.model}'s own short factual answers -- asked through its chat template (zero-shot, "
                "with a system prompt or with example turns) or as plain `Question:/Answer:` prompts, with or without "
                "a passage -- for how likely they are to be wrong. "
                + DESIGN_TEXT[args.design]
                + probe
                + " Trained on the robustness corpus "
                "(`flowcheck corpus`, docs/guides/corpus.md): the model's greedy answers to "
                f"{len(tr)} questions from {', '.join(sorted(set(task[tr].tolist())))}, judged against their "
                "references. Scores are calibrated on validation answers of that mix (about "
                f"{cal.get('hallucinated_share', float('nan')):.0%} wrong); thresholds per prompt style are in "
                "*Operating points*.\n\n| prompt style | training answers | hallucinated |\n|---|---|---|\n" + counts
            ),
        },
        {
            "title": "Limits",
            "text": (
                "- On prompt styles and tasks it was not trained on, the transfer table below compares it with "
                "token confidence (-min / -mean log p) and lm-polygraph's best single-pass estimators cell by cell; "
                "on several cells it is only level with them. It is not a fact checker.\n"
                "- Calibrated to the training mix: where your model is wrong less often, the same score means a "
                "lower hallucination rate; choose a threshold on a few labelled answers of your own.\n"
                "- Short answers (a phrase or a sentence, at most 64 tokens); long-form answers, dialogue and "
                "summaries are untested. TruthfulQA was held out of training (its canary).\n"
                "- The HaluEval-QA two-shot format with a passage is better served by "
                f"`{BUNDLED[args.model]}`, trained on it."
            ),
        },
    ]
    if getattr(args, "report", None):
        sections.append(_transfer_section(args.report))
    return sections


def _transfer_section(report_path: str) -> dict:
    """The card's transfer table from a ``report`` JSON."""
    rep = json.loads(Path(report_path).read_text())
    rows = ["| held out | answers (halluc.) | this design | -mean log p | -min log p | best lm-polygraph |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for key, cell in rep["cells"].items():
        poly = max(
            ((k, c["auroc"]) for k, c in cell.items() if k.startswith("polygraph") and c.get("auroc") is not None),
            key=lambda kv: kv[1], default=(None, None),
        )  # fmt: skip
        v = cell["validator"]
        rows.append(
            f"| {key} | {v['n']} ({v.get('pos')}) | {v['auroc']} {v.get('ci')} | {cell['-mean log p']['auroc']} "
            f"| {cell['-min log p']['auroc']} | " + (f"{poly[1]} ({poly[0]}) |" if poly[0] else "not run |")
        )
    return {
        "title": "Transfer (held-out prompt styles and tasks)",
        "text": "AUROC with 95% bootstrap intervals; each row trained without the held-out cell.\n\n"
        + "\n".join(rows)
        + f"\n\n```bash\n{rep.get('command', '')}\n```",
    }


def old_protocol(args: argparse.Namespace) -> int:
    """A validator on the bundled validators' own protocol: HaluEval-QA, plain two-shot with a passage.

    The test split is the one ``flowcheck train`` used for the shipped validator (seed 0, grouped by
    record, over the answers file's labelled records); the first ``--limit`` of its answers (answers
    file order) are replayed with the validator's own flow recipe and scored, next to token confidence
    on the same answers.
    """
    from hf_flowcheck.data.splits import split_records
    from hf_flowcheck.workflows.answers import read_answers

    v = FlowValidator.from_pretrained(args.validator).eval()
    recs = read_answers(args.answers).labelled
    test = set(split_records([r.uid for r in recs], seed=0).test)
    rows = [r for r in recs if r.uid in test][: args.limit]
    model, tok = load_model(args.model)
    model.eval()
    out = Path(args.features)
    # The signatures go to the store; a token-confidence channel is attached after (the same code as
    # at run time, tests/test_token_confidence.py), so one store serves both validator designs.
    # --one-pass stores the validator's own token-confidence states with the signatures instead (one
    # forward per answer) and reads the baselines from them (over the scored content tokens).
    one_pass = args.one_pass and v.flow_config.state_summary == "token_confidence"
    # A pooled residual state comes from the flow forward itself: the store keeps the validator's own states.
    own_states = one_pass or v.flow_config.state_summary == "mean"
    extract_dataset(
        model, tok, rows, out, protocol="replayed", batch_size=8, shard_size=32, progress=False,
        config=v.flow_config if own_states else dataclasses.replace(v.flow_config, state_summary="none"),
        dataset={"answers": args.answers, "split": "test", "limit": args.limit},
    )  # fmt: skip
    feats, y, uids = FeatureStore.open(out).load()
    y = y.numpy().astype(int)
    by_uid = {r.uid: r for r in rows}
    ex = [
        ScoredExample(encode_text(tok, by_uid[u].prompt), list(by_uid[u].gen_ids), int(by_uid[u].label), u)
        for u in uids
    ]
    if own_states:
        pass  # the store holds the validator's own states
    elif v.flow_config.state_summary == "token_confidence":
        from hf_flowcheck.detectors.base import batch_examples
        from hf_flowcheck.extraction import FlowExtractor

        ext = FlowExtractor(model, v.flow_config, tokenizer=tok)
        with torch.inference_mode():
            states = torch.cat([ext.token_confidence(*batch_examples(ex[i : i + 8], 0)) for i in range(0, len(ex), 8)])
        feats = dataclasses.replace(feats, states=states)
    elif v.flow_config.state_summary != "none":
        raise SystemExit(f"old-protocol reads token-confidence or mean states, not {v.flow_config.state_summary!r}.")
    if one_pass:
        conf = feats.states[:, 0].double().numpy()
    else:
        with torch.inference_mode():
            conf = token_confidence_features(model, ex, batch_size=8)
    scores = {"validator": score(v, feats), "-mean log p": conf[:, 0], "-min log p": conf[:, 1]}
    result = {"validator": args.validator, "answers": len(y), "hallucinated": int(y.sum()),
              "command": "python benchmarks/corpus_transfer.py " + " ".join(sys.argv[1:])}  # fmt: skip
    for name, sc in scores.items():
        result[name] = ci_row(y, np.asarray(sc, dtype=float))
    ok = ~np.isnan(scores["validator"])
    lo, hi = paired_auroc_difference(y[ok], scores["validator"][ok], np.asarray(scores["-min log p"])[ok], n=500)
    result["validator minus -min log p"] = [round(lo, 3), round(hi, 3)]
    if args.exclude_corpus:
        asked = {r.uid for f in read_corpus(args.exclude_corpus) for r in f.records}
        fresh = np.array([u not in asked for u in uids])
        unseen = {name: ci_row(y[fresh], np.asarray(sc, dtype=float)[fresh]) for name, sc in scores.items()}
        okf = ok & fresh
        lo, hi = paired_auroc_difference(y[okf], scores["validator"][okf], np.asarray(scores["-min log p"])[okf], n=500)
        unseen["validator minus -min log p"] = [round(lo, 3), round(hi, 3)]
        result["records the corpus never asked"] = {"answers": int(fresh.sum()), **unseen}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


def card(args: argparse.Namespace) -> int:
    """Add the old-protocol figure (``old-protocol``'s JSON) to a bundled validator's card; weights untouched."""
    v = FlowValidator.from_pretrained(args.validator)
    if args.report:  # replace the transfer table (a matrix finished after the bundle)
        table = _transfer_section(args.report)
        kept = [x for x in v.training_metadata.get("card_sections", []) if x["title"] != table["title"]]
        v.training_metadata["card_sections"] = [*kept, table]
    res = json.loads(Path(args.old_protocol).read_text())
    val, mn, mx = res["validator"], res["-min log p"], res["-mean log p"]
    text = (
        f"On its bundled siblings' own protocol (HaluEval-QA, the plain two-shot prompt with a passage, the first "
        f"{res['answers']} answers of their seed-0 test split, {val['n']} scored): AUROC {val['auroc']} "
        f"{val['ci']}, against -min log p {mn['auroc']} and -mean log p {mx['auroc']} on the same answers (paired "
        f"difference to -min log p {res['validator minus -min log p']}). {sibling_figure(model_of(v))}."
        "\n\n```bash\n" + res["command"] + "\n```"
    )
    sections = [x for x in v.training_metadata.get("card_sections", []) if x["title"] != "HaluEval-QA two-shot format"]
    v.training_metadata["card_sections"] = [*sections, {"title": "HaluEval-QA two-shot format", "text": text}]
    v.save_pretrained(args.validator, overwrite=True)
    print(f"added the old-protocol figure to {args.validator}/README.md")
    return 0


def reliability_png(y: np.ndarray, runs: dict, shipped_scores: np.ndarray, path: str, bins: int = 10) -> None:
    """Reliability diagram per held-out prompt style: observed hallucination rate against the mean score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = [k for k in runs if k.startswith("style=")]
    fig, axes = plt.subplots(1, len(styles), figsize=(3.2 * len(styles), 3.4), sharey=True)
    edges = np.linspace(0, 1, bins + 1)
    for ax, key in zip(np.atleast_1d(axes), styles, strict=True):
        idx = np.asarray(runs[key]["test"])
        for name, scores, style in (("corpus-trained", np.asarray(runs[key]["scores"]), "o-"),
                                    ("shipped v0.5", shipped_scores, "s--")):  # fmt: skip
            sc, yy = scores[idx], y[idx]
            ok = ~np.isnan(sc)
            sc, yy = sc[ok], yy[ok]
            which = np.clip(np.digitize(sc, edges) - 1, 0, bins - 1)
            xs = [sc[which == b].mean() for b in range(bins) if (which == b).sum() >= 5]
            ys = [yy[which == b].mean() for b in range(bins) if (which == b).sum() >= 5]
            ax.plot(xs, ys, style, label=name, markersize=4)
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set_title(key.removeprefix("style=") + " held out", fontsize=9)
        ax.set_xlabel("mean score in bin")
    np.atleast_1d(axes)[0].set_ylabel("hallucinated share")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_state_flags(p: argparse.ArgumentParser) -> None:
    """The flow+mean-state design's flags (matrix and bundle)."""
    p.add_argument("--pooled", default=None, help="flow+mean-state: the states of `pooled_state_probe.py extract`.")
    p.add_argument("--state-depth", type=int, default=0, help="flow+mean-state: the block whose input state it reads.")
    p.add_argument("--probe-all-pooled", action="store_true",
                   help="flow+mean-state: fit the frozen probe on every pooled answer of the training cells, "
                   "also those without flow features (the flow part still trains on the replayed ones).")  # fmt: skip
    p.add_argument(
        "--state-l2", type=float, default=1e-2, help="L2 penalty of the frozen probe (TrainConfig.state_l2)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay")
    r.add_argument("--model", choices=tuple(BUNDLED), default="SmolLM2-135M-Instruct")
    r.add_argument("--corpus", required=True)
    r.add_argument("--features", required=True)
    r.add_argument("--tasks", nargs="+", default=None,
                   help="Only these tasks, in this order (e.g. to share the cells between two processes).")  # fmt: skip
    r.add_argument("--max-per-cell", type=int, default=None, help="Replay only each cell's first N labelled answers.")
    r.add_argument("--one-pass", action="store_true",
                   help="Token-confidence states from the flow forward (no residual states, no extra forwards).")  # fmt: skip
    r.add_argument("--mean-state", action="store_true",
                   help="The residual state averaged over the content tokens as the store's states (flow+mean-state).")  # fmt: skip
    r.add_argument("--basis-solver", choices=("eigh", "subspace"), default="eigh",
                   help="FlowConfig.basis_solver of the replay: 'subspace' gives the same features to float32 "
                   "precision, faster; a validator trained on them scores with either.")  # fmt: skip
    r.set_defaults(func=replay)
    cf = sub.add_parser("confidence")
    cf.add_argument("--model", choices=tuple(BUNDLED), default="SmolLM2-135M-Instruct")
    cf.add_argument("--corpus", required=True)
    cf.add_argument("--features", required=True)
    cf.add_argument("--tasks", nargs="+", default=None)
    cf.add_argument("--all-answers", action="store_true", help="Also answers not replayed into a feature store yet.")
    cf.set_defaults(func=confidence)
    m = sub.add_parser("matrix")
    m.add_argument("--model", choices=tuple(BUNDLED), default="SmolLM2-135M-Instruct")
    m.add_argument("--features", required=True)
    m.add_argument("--scores", required=True, help="JSON of every run's scores per answer (resumable input of report).")
    m.add_argument("--epochs", type=int, default=20)
    m.add_argument("--design", choices=DESIGNS, default="shipped")
    m.add_argument("--held-out", choices=("styles-and-tasks", "styles", "tasks"), default="styles-and-tasks",
                   help="Which cells are held out in turn (plus one in-distribution split).")  # fmt: skip
    m.add_argument("--skip-in-distribution", action="store_true",
                   help="No in-distribution reference run (another process of the same matrix makes it).")  # fmt: skip
    m.add_argument("--seed", type=int, default=0)
    _mean_state_flags(m)
    m.set_defaults(func=matrix)
    b = sub.add_parser("bundle")
    b.add_argument("--model", choices=tuple(BUNDLED), default="SmolLM2-135M-Instruct")
    b.add_argument("--features", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--report", default=None, help="The transfer report (JSON of `report`) for the model card.")
    b.add_argument("--epochs", type=int, default=20)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--design", choices=("flow-only", "flow+token-confidence", "flow+mean-state"), default="flow-only")
    _mean_state_flags(b)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=bundle)
    c = sub.add_parser("card")
    c.add_argument("--validator", required=True)
    c.add_argument("--old-protocol", required=True, help="The JSON written by `old-protocol`.")
    c.add_argument("--report", default=None, help="Also (re)write the transfer table from this `report` JSON.")
    c.set_defaults(func=card)
    o = sub.add_parser("old-protocol")
    o.add_argument("--model", choices=tuple(BUNDLED), default="SmolLM2-135M-Instruct")
    o.add_argument("--validator", required=True)
    o.add_argument("--answers", required=True, help="The answers file the shipped validator was trained on.")
    o.add_argument("--features", required=True, help="Where the replayed test answers are stored (resumable).")
    o.add_argument("--limit", type=int, default=300)
    o.add_argument("--one-pass", action="store_true",
                   help="A token-confidence validator's states and the baselines from the flow forward (one per answer).")  # fmt: skip
    o.add_argument("--exclude-corpus", default=None,
                   help="A corpus folder (e.g. answers/<model>/corpus): also report the answers whose HaluEval record "
                   "none of its cells asked (a corpus validator may have seen the others' questions).")  # fmt: skip
    o.add_argument("--out", required=True)
    o.set_defaults(func=old_protocol)
    rp = sub.add_parser("report")
    rp.add_argument("--features", required=True)
    rp.add_argument("--scores", required=True, nargs="+", help="One matrix, or its parts from several processes.")
    rp.add_argument("--out", required=True)
    rp.add_argument("--plot", default=None, help="Also write a reliability diagram (PNG) of the held-out styles.")
    rp.set_defaults(func=report)
    dg = sub.add_parser("designs", help="Two designs' matrices of one store, cell by cell, with paired intervals.")
    dg.add_argument(
        "--scores",
        required=True,
        nargs=2,
        help="Two matrix score files (compared on the answers both tested, matched by uid).",
    )
    dg.add_argument("--out", required=True)
    dg.set_defaults(func=designs)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
