"""Gradient signatures per contiguous 5-block band vs all blocks (the article's "last five hold 97%").

Same examples and split as ``flowcheck compare`` on the store (``examples_from_store``, seeded
70/10/20 split). Signatures of all blocks are computed once and sliced per band (exact: a block's
parameter gradient does not depend on where the backward stops below it). Prints AUROC with 95%
intervals per band, the share of the last band, ``(AUROC_last - 0.5) / (AUROC_all - 0.5)``, and the
cost of the last band and of all blocks as ratios to one no-grad forward.

``flowcheck compare --layer-ablation`` runs the same function after the comparison; this script
runs it alone (the comparison's other detectors are not needed for it).

Run: ``python benchmarks/gradient_layer_ablation.py --features runs/selfaware-900 --json runs/cmp/ablation-selfaware.json``
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help="Feature store written by `flowcheck extract`.")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--band", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from hf_flowcheck.data.splits import split_records
    from hf_flowcheck.detectors.checkpoint import jsonable
    from hf_flowcheck.detectors.gradient import GradientConfig
    from hf_flowcheck.offline_models import load_model
    from hf_flowcheck.workflows.compare import SPLITS, examples_from_store, gradient_layer_ablation, split_parts
    from hf_flowcheck.workflows.store import FeatureStore

    store = FeatureStore.open(args.features)
    model, tok = load_model(args.model)
    model.eval()
    examples = examples_from_store(store, tok)
    split = split_records([e.uid for e in examples], seed=args.split_seed)
    parts = split_parts(examples, {n: list(split[n]) for n in SPLITS})
    res = gradient_layer_ablation(
        model,
        parts["train"],
        parts["validation"],
        parts["test"],
        config=GradientConfig(seed=args.seed),
        band=args.band,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    res["sizes"] = {n: len(parts[n]) for n in SPLITS}
    res["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    def ci(row: dict) -> str:
        return " ".join("n/a" if row[k] is None else f"{row[k]:.3f}" for k in ("auroc", "low", "high"))

    print(f"{args.features}: " + ", ".join(f"{n} {len(parts[n])}" for n in SPLITS))
    for row in res["bands"]:
        print(f"  blocks {row['blocks'][0]:2d}-{row['blocks'][-1]:2d}: AUROC, 95% interval {ci(row)}")
    print(f"  all {res['num_blocks']} blocks: AUROC, 95% interval {ci(res['all'])}")
    print(f"  share of the last band: {res['share_last_band']}")
    print(f"  cost vs one forward: {res['cost']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(jsonable(res, "ablation"), fh, indent=2)


if __name__ == "__main__":
    main()
