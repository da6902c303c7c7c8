"""``boundary="normalized"`` (the paper's §3.1, our default) vs ``"residual"`` (the authors' code).

Apples to apples on the HaluEval-QA *generated* set: the answers the model generated (and the
judge's labels) are read from a generated feature store written by ``flowcheck extract``, then
replayed teacher-forced with each boundary setting (the paper's own protocol: generate, then
replay — capture during generation gives the same features, see ``tests/test_real_model.py``).
Both validators use the same split, seeds and training settings; the table shows the test split,
for the GRU validator and for the pooled-feature logistic probe of ``pooled_flow_probe.py``.

``--reuse-generated`` takes the normalized side from the generated store itself (captured during
generation, which equals the teacher-forced replay; ``tests/test_real_model.py``) when that store
was extracted with ``boundary="normalized"``; only the residual side is replayed.

Run: ``python benchmarks/boundary_comparison.py --generated runs/qa-gen-normalized --out runs/boundary --reuse-generated``
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generated", required=True, help="Generated-protocol store from `flowcheck extract`.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--reuse-generated", action="store_true", help="Normalized side = the generated store itself.")
    ap.add_argument(
        "--keep-empty",
        action="store_true",
        help="Also use empty answers. Off by default: replayed, an empty answer becomes the token after "
        "'Answer:' and gets events that only the residual side has, while all empty answers are labelled "
        "hallucinated, which would hand that side a shortcut.",
    )
    ap.add_argument("--suffix", default="", help="Appended to the validator folder names.")
    args = ap.parse_args()

    from pooled_flow_probe import probe_rows

    from hf_flowcheck import FlowConfig
    from hf_flowcheck.data import LabeledExample, generation_prompt, load_halueval_qa
    from hf_flowcheck.metrics import format_table
    from hf_flowcheck.offline_models import load_model
    from hf_flowcheck.workflows.compare import generated_completion
    from hf_flowcheck.workflows.experiments import train_from_store
    from hf_flowcheck.workflows.extract import extract_dataset
    from hf_flowcheck.workflows.store import FeatureStore

    store = FeatureStore.open(args.generated)
    if store.protocol != "generated":
        raise SystemExit(f"{args.generated} holds the {store.protocol!r} protocol; pass a generated store.")
    samples = store.samples()
    wanted = {s["uid"] for s in samples}
    records = {r.uid: r for r in load_halueval_qa() if r.uid in wanted}
    examples = [  # replay the model's own text, as `flowcheck compare` does
        LabeledExample(
            s["uid"],
            "qa",
            generation_prompt(records[s["uid"]]),
            s["answer"],
            int(s["label"]),
            "generated",
            completion=generated_completion(s.get("raw_answer"), str(s["answer"])),
        )
        for s in samples
    ]
    empty = [s["uid"] for s in samples if not str(s["answer"]).strip()]
    drop = None if args.keep_empty else empty
    print(f"{len(empty)} empty answers: {'kept' if args.keep_empty else 'left out of every split (after splitting)'}")
    model, tok = load_model(args.model)
    out = Path(args.out)
    rows = {}
    for boundary in ("normalized", "residual"):
        if boundary == "normalized" and args.reuse_generated:
            if store.config.boundary != "normalized":
                raise SystemExit(
                    f"--reuse-generated: {args.generated} was extracted with boundary={store.config.boundary!r}."
                )
            feats_dir = Path(args.generated)
        else:
            feats_dir = out / f"replay-{boundary}"
        if feats_dir != Path(args.generated):
            extract_dataset(
                model,
                tok,
                examples,
                feats_dir,
                config=FlowConfig(boundary=boundary),
                protocol="natural",
                batch_size=8,
                shard_size=256,
                progress=False,
                dataset={"name": "halueval-qa generated answers (replayed)", "source": str(args.generated)},
            )
        _, report = train_from_store(
            feats_dir,
            out / f"validator-{boundary}{args.suffix}",
            epochs=args.epochs,
            patience=args.patience,
            n_bootstrap=args.bootstrap,
            drop_uids=drop,
            progress=False,
            command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        )
        rows[f"boundary={boundary}: GRU validator"] = report["rows"]["flow validator"]
        probe = probe_rows(FeatureStore.open(feats_dir), n_bootstrap=args.bootstrap, drop_uids=drop)
        rows[f"boundary={boundary}: pooled probe"] = probe["rows"]["pooled flow features + logistic regression"]
        print(f"{boundary}: split {report['split']}; best val AUROC {report['history']['best_val_auroc']:.3f}")
        print(f"{boundary}: pooled probe validation AUROC {probe['validation_auroc']:.3f}")
    print(format_table(rows))
    (out / f"comparison{args.suffix}.json").write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
