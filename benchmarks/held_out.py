"""A shipped validator on answers it never saw: its own test split plus every answer added since.

A validator trained on the first ``--trained-parts`` part stores of a replay root saw their train
and validation splits (split seed ``--split-seed``). When the answers file has grown since, every
answer of the later parts is as unseen as that test split. This scores, on the union of the two
(the held-out set), the validators, the hidden-state probes (1 and 3 depths, fitted on the same
train split, layer chosen on the same validation split), a pooled-flow logistic regression (train
split), answer length and exact token confidence, with 95% bootstrap intervals and paired
bootstrap intervals of "validator minus each baseline" on the same resampled answers. Rows are
also reported for the original test split and the new answers separately.

Run: ``python benchmarks/held_out.py --parts runs/replay/qwen-qa --trained-parts 3
--validator hf_flowcheck/bundled/validators/qwen2.5-coder-0.5b-instruct-halueval-qa
--confidence runs/confidence-qwen-qa.json --out runs/cmp/qwen-held-out.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from compare_subset import _row, confidence_scores, paired_difference, probe_scores, store_arguments
from validator_selection import FLOW, channels, logistic

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import FlowValidator
from hf_flowcheck.detectors.baselines import final_readout_confidence, pooled_flow_features
from hf_flowcheck.workflows.replay import PartedStore


def record(a, scores: dict[str, np.ndarray], y_all: np.ndarray, held: np.ndarray, n_new: int) -> None:
    """Add the held-out rows to ``--record-in``'s model card; its weights and other files stay as they are."""
    import shutil
    import tempfile

    from safetensors.torch import load_file

    from hf_flowcheck.detectors.checkpoint import file_sha256
    from hf_flowcheck.metrics import evaluate_scores

    folder = Path(a.record_in)
    name = f"validator {str(a.record_in).rstrip('/').split('/')[-1]}"
    if name not in scores:
        raise SystemExit(f"--record-in {a.record_in} is not one of the --validator folders")
    rows = {}
    for row, s_all in scores.items():
        s = s_all[held]
        if np.isnan(s).any():
            continue
        result = evaluate_scores(y_all[held], s, name=row, n_bootstrap=1000, seed=0)
        # accuracy at 0.5 means nothing for scores that are not probabilities (length, log-probs)
        result["metrics"] = {k: v for k, v in result["metrics"].items() if not k.startswith("accuracy")}
        rows["this validator" if row == name else row] = result
    v = FlowValidator.from_pretrained(folder)
    baselines = "Baselines fitted on the same train split, the probes' depths chosen on the same validation split."
    if n_new:
        title = f"Held out: the test split plus {n_new} answers added after training"
        note = (
            f"The answers file grew after training; its {n_new} newer labelled answers were never seen in "
            f"training or selection, like the test split above. {baselines}"
        )
    else:  # the validator was trained on every part: the held-out set is its test split
        title, note = "The test split, against the baselines", baselines
    v.record_later_evaluation(title, rows, command="python " + " ".join(sys.argv), note=note)
    with tempfile.TemporaryDirectory() as tmp:
        v.save_pretrained(tmp)
        # Keep the folder's weights file byte for byte (a re-save may order its header differently).
        old, again = load_file(str(folder / "model.safetensors")), load_file(str(Path(tmp) / "model.safetensors"))
        assert old.keys() == again.keys() and all(torch.equal(old[k], again[k]) for k in old)
        config = json.loads((Path(tmp) / "config.json").read_text())
        config["weights_sha256"] = file_sha256(folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config, sort_keys=True, indent=2), encoding="utf-8")
        shutil.copyfile(Path(tmp) / "README.md", folder / "README.md")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    store_arguments(p)
    p.add_argument("--trained-parts", type=int, required=True, help="how many parts the validator's store had")
    p.add_argument("--uids-out", default=None, help="also write the held-out uids (a JSON list) here")
    p.add_argument(
        "--record-in",
        default=None,
        help="a --validator folder: add the held-out table to its model card (config.json and README.md)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    store = PartedStore(a.parts)
    feats, labels, uids = store.load()
    numbers = [int(s.manifest["dataset"]["part"]) for s in store.parts]
    if not set(range(a.trained_parts)) <= set(numbers):
        raise SystemExit(f"{a.parts}: parts 0..{a.trained_parts - 1} are not all complete (have {numbers})")
    part_of = np.concatenate([np.full(len(s), k) for k, s in zip(numbers, store.parts)])
    old = [u for u, k in zip(uids, part_of) if k < a.trained_parts]
    split = split_records(old, seed=a.split_seed)
    index = {u: i for i, u in enumerate(uids)}
    tr = np.array([index[u] for u in split.train])
    va = np.array([index[u] for u in split.validation])
    seen = set(split.train) | set(split.validation)
    old_test = np.array([index[u] for u in split.test])
    new = np.array([i for i, k in enumerate(part_of) if k >= a.trained_parts and uids[i] not in seen], dtype=np.int64)
    y_all = labels.numpy()
    if a.uids_out:  # the answers to score with answer_confidence.py --uids
        held = [uids[i] for i in np.concatenate([old_test, new])]
        Path(a.uids_out).write_text(json.dumps(held))

    scores: dict[str, np.ndarray] = {}
    for folder in a.validator:
        v = FlowValidator.from_pretrained(folder)
        name = f"validator {folder.rstrip('/').split('/')[-1]}"
        scores[name] = v.score_features(feats.select(v.config.feature_names)).scores.double().numpy()
    scores.update(probe_scores(feats, y_all, tr, va))
    flow = pooled_flow_features(channels(feats, FLOW))  # the tables' "pooled flow + LR" (validator_selection.py)
    scores["pooled flow features + logistic regression"] = logistic(flow[tr], y_all[tr], [flow])[0]
    scores["answer length (tokens)"] = (feats.positions >= 0).sum(1).double().numpy()
    conf = final_readout_confidence(feats)
    if conf is not None:
        scores["final-readout confidence (-mean log p of the top token)"] = conf.double().numpy()
    if a.confidence:
        scores.update(confidence_scores(a.confidence, uids))

    report: dict = {
        "parts": a.parts,
        "trained_parts": a.trained_parts,
        "split_seed": a.split_seed,
        "train": len(tr),
        "validation": len(va),
        "sets": {},
    }
    for set_name, idx in (("held out (test split + new answers)", np.concatenate([old_test, new])),
                          ("test split of the training store", old_test), ("new answers only", new)):  # fmt: skip
        if len(idx) == 0 or (len(new) == 0 and set_name != "held out (test split + new answers)"):
            continue  # without new answers the held-out set is the test split: one table, not three
        y = y_all[idx]
        rows = {}
        validators = {k: s[idx] for k, s in scores.items() if k.startswith("validator")}
        for name, s_all in scores.items():
            s = s_all[idx]
            ok = ~np.isnan(s)
            if len(np.unique(y[ok])) < 2:  # e.g. token confidence not computed for these answers yet
                continue
            rows[name] = _row(y[ok], s[ok])
            rows[name]["covered"] = int(ok.sum())
            if not name.startswith("validator") and ok.all():
                for vname, vs in validators.items():
                    rows[name][f"{vname} minus this"] = paired_difference(y, vs, s)
        report["sets"][set_name] = {"n": len(idx), "positives": int(y.sum()), "rows": rows}
        print(f"\n{set_name}: {len(idx)} answers ({int(y.sum())} hallucinated)", file=sys.stderr)
        for name, r in rows.items():
            extra = {k.split(" minus")[0][-12:]: [round(x, 3) for x in v] for k, v in r.items() if "minus" in k}
            cov = "" if r["covered"] == len(idx) else f" (on {r['covered']})"
            print(
                f"  {name}: {r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]{cov} AUPRC {r['auprc']:.3f} "
                f"P@R0.8 {r['precision_at_recall_0.8']:.3f} {extra or ''}",
                file=sys.stderr,
            )
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=float))
    if a.record_in:
        record(a, scores, y_all, np.concatenate([old_test, new]), len(new))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
