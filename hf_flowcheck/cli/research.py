"""Research commands, thin over :mod:`hf_flowcheck.workflows`: answers, replay, extract, train, evaluate, compare."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_flowcheck.cli.options import (
    add_config_flags,
    add_model_options,
    config_from_flags,
    load_model_from_args,
    positive_int,
)
from hf_flowcheck.configuration import STATE_SUMMARIES, FlowConfig
from hf_flowcheck.data import DATASET_NAMES, Example
from hf_flowcheck.data.splits import SPLIT_NAMES, split_records
from hf_flowcheck.detectors.base import Detector, ScoredExample
from hf_flowcheck.detectors.gradient import GradientConfig
from hf_flowcheck.detectors.registry import registered_detectors
from hf_flowcheck.metrics import format_table
from hf_flowcheck.stopping import AnswerLineStop, supports_answer_line_stop
from hf_flowcheck.workflows.answers import AnswerDecoding, generate_answers, load_answer_records, read_answers
from hf_flowcheck.workflows.compare import (
    GenerationTiming,
    compare_detectors,
    examples_from_store,
    gradient_layer_ablation,
    split_parts,
)
from hf_flowcheck.workflows.experiments import evaluate_validator_on_store, train_from_store
from hf_flowcheck.workflows.extract import RECORD_LABEL, extract_dataset, newline_stop_kwargs
from hf_flowcheck.workflows.extract_config import ExtractConfig
from hf_flowcheck.workflows.replay import PartedStore, replay_answers
from hf_flowcheck.workflows.train_config import TrainConfig

__all__ = [
    "register",
]


def run_corpus(args: Any) -> int:
    """``flowcheck corpus``: the model's own answers in every task and prompt style, resumable, in rounds."""
    from hf_flowcheck.data.corpus import CORPUS_TASKS
    from hf_flowcheck.fingerprint import model_fingerprint
    from hf_flowcheck.workflows.corpus import generate_corpus

    tasks = args.tasks or list(CORPUS_TASKS)
    model, tok = load_model_from_args(args)
    counts = generate_corpus(
        model,
        tok,
        args.out,
        fingerprint=model_fingerprint(model),
        tasks=tasks,
        per_cell=args.per_cell,
        per_round=args.per_round,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(f"{args.out}: {sum(counts.values())} answers in {len(counts)} cells")
    return 0


def run_answers(args: Any) -> int:
    """``flowcheck answers``: the model's greedy answers into a committed, resumable JSONL."""
    from transformers import StoppingCriteriaList

    from hf_flowcheck import data
    from hf_flowcheck.fingerprint import model_fingerprint

    records, judge = load_answer_records(args.dataset, args.data_dir, seed=args.seed, limit=args.limit)
    decoding = config_from_flags(args, AnswerDecoding, dest_prefix="decoding_")
    model, tok = load_model_from_args(args)
    generate_answers(
        model,
        tok,
        records,
        args.out,
        prompt_fn=lambda ex: data.generation_prompt(ex),
        judge=judge,
        dataset={"name": args.dataset, "order": "permutation", "seed": args.seed, "prompt_style": "plain"},
        fingerprint=model_fingerprint(model),
        decoding=AnswerDecoding(
            max_new_tokens=decoding.max_new_tokens,
            batch_size=decoding.batch_size,
            generate_kwargs={"stopping_criteria": StoppingCriteriaList([AnswerLineStop(tok)])},
            # the header records the batch size: batched greedy decoding can differ from batch 1 in the last bits
            description={"stop": "answer-line", "batch_size": decoding.batch_size, "padding": "left"},
        ),
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(f"{args.out}: {read_answers(args.out).counts()}")
    return 0


def run_replay(args: Any) -> int:
    """``flowcheck replay``: teacher-forced features of an answers file, in part stores."""
    if args.start_part < 0:
        raise ValueError(f"--start-part must be 0 or more, got {args.start_part}.")
    config = FlowConfig(
        lens_features=args.lens_features, lens_candidates=args.lens_candidates, state_summary=args.state_summary,
        competitor_candidates=args.competitor_candidates,
    )  # fmt: skip
    model, tok = load_model_from_args(args)
    parts = replay_answers(
        model, tok, args.answers, args.out, config=config, part_size=args.part_size,
        batch_size=args.batch_size, include_partial=True, progress=not args.no_progress,
        start_part=args.start_part, skip_started=args.skip_started,
    )  # fmt: skip
    print(f"{args.out}: {len(parts)} part store(s), {len(PartedStore(args.out))} answers with features")
    return 0


def add_extract_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``flowcheck extract`` options to ``parser`` (a subcommand parser).

    Wire it with ``sub.add_parser("extract", ...)``, this function, and
    ``set_defaults(func=run_extract)``.
    """
    add_model_options(parser)
    parser.add_argument(
        "--dataset", required=True, help=f"One of {', '.join(DATASET_NAMES)}, or a path to a JSON Lines file."
    )
    parser.add_argument("--task", default="qa", help="Task of a JSON Lines --dataset (selects fields and prompt).")
    parser.add_argument("--data-dir", default=None, help="Data directory (default: $HF_FLOWCHECK_DATA or bundled).")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first LIMIT source records.")
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        help="Use a seeded random subset of SAMPLE records (after --limit), kept in file order; for files "
        "sorted by label such as SelfAware, where the first records are all of one class.",
    )
    parser.add_argument("--sample-seed", type=int, default=0, help="Seed of --sample.")
    parser.add_argument("--out", required=True, help="Output directory of the feature store.")
    parser.add_argument(
        "--judge",
        choices=("reference-f1", RECORD_LABEL),
        default=None,
        help="Generated protocol: reference-f1 (token F1 vs the right answer; default) or record-label (keep "
        "the record's own label; default for selfaware).",
    )
    parser.add_argument(
        "--prompt-style", choices=("plain", "chat", "auto"), default="plain", help="Generated-protocol prompt style."
    )
    parser.add_argument(
        "--stop-at-newline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Generated protocol: stop a row at the end of its first non-empty line (the judged answer); "
        "leading newlines do not stop it.",
    )
    run_group = parser.add_argument_group(
        "how the dataset is run (ExtractConfig fields; --protocol defaults to natural for halueval-general, "
        "else generated)"
    )
    add_config_flags(run_group, ExtractConfig, dest_prefix="run_")
    add_config_flags(
        parser.add_argument_group("flow configuration (FlowConfig fields)"), FlowConfig, dest_prefix="flow_"
    )
    return parser


def _load_records(args: argparse.Namespace) -> list[Example]:
    records = _read_records(args)
    sample = getattr(args, "sample", None)
    if sample is None:
        return records
    if sample < 1:
        raise ValueError(f"--sample {sample} must be a positive number of records.")
    if sample >= len(records):
        return records
    import numpy as np

    keep = np.random.default_rng(args.sample_seed).choice(len(records), size=sample, replace=False)
    return [records[i] for i in sorted(keep.tolist())]  # file order: shards stay reproducible


def _read_records(args: argparse.Namespace) -> list[Example]:
    from hf_flowcheck import data

    return data.load_by_name(args.dataset, args.data_dir, task=args.task, limit=args.limit)


def run_extract(args: argparse.Namespace) -> int:
    """Run ``flowcheck extract`` from parsed arguments; returns the exit status (0 ok, 2 user error)."""
    from hf_flowcheck import data

    config = config_from_flags(args, FlowConfig, dest_prefix="flow_")
    records = _load_records(args)
    default_protocol = "natural" if args.dataset == "halueval-general" else "generated"
    run = config_from_flags(
        args, ExtractConfig, dest_prefix="run_", protocol=getattr(args, "run_protocol", default_protocol)
    )
    protocol = run.protocol
    t0 = time.perf_counter()
    model, tokenizer = load_model_from_args(args)
    print(f"Loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    judge: Any = None
    prompt_fn = None
    if protocol == "paired":
        examples: list[Any] = data.paired_examples(records)
    elif protocol == "natural":
        examples = data.natural_examples(records)
    else:
        examples = list(records)
        default_judge = RECORD_LABEL if args.dataset == "selfaware" else "reference-f1"
        judge = RECORD_LABEL if (args.judge or default_judge) == RECORD_LABEL else data.ReferenceF1Judge()
        style = args.prompt_style
        prompt_fn = (
            None if style == "plain" else (lambda ex: data.generation_prompt(ex, style=style, tokenizer=tokenizer))
        )
    t0 = time.perf_counter()
    store = extract_dataset(
        model,
        tokenizer,
        examples,
        args.out,
        config=config,
        extract_config=run,
        judge=judge,
        prompt_fn=prompt_fn,
        dataset={
            "name": args.dataset,
            "limit": args.limit,
            "sample": args.sample,
            "sample_seed": args.sample_seed if args.sample is not None else None,
            "prompt_style": args.prompt_style,
        },
        generate_kwargs=newline_stop_kwargs(tokenizer) if protocol == "generated" and args.stop_at_newline else None,
    )
    counts = store.counts
    print(
        f"Wrote {counts.get('stored', 0)} samples ({counts.get('label_0', 0)} correct, {counts.get('label_1', 0)} "
        f"hallucinated; {counts.get('dropped', 0)} dropped, {counts.get('failed', 0)} failed) in "
        f"{len(store.shards)} shard(s) to {store.path} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


#: ``flowcheck train`` flags whose name is not the TrainConfig field's.
_TRAIN_FLAG_NAMES = {"n_bootstrap": "--bootstrap"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``flowcheck train``'s flags: where the data and output live, then one flag per :class:`TrainConfig` field
    (its default, choices and help; one owner)."""
    p.add_argument("--features", required=True, help="Feature store written by `flowcheck extract` or `replay`.")
    p.add_argument("--out", required=True, help="Folder for the trained validator.")
    add_config_flags(
        p.add_argument_group("training (TrainConfig fields)"), TrainConfig, flag_names=_TRAIN_FLAG_NAMES,
        exclude=("device",),  # --device below: where to train is not part of the recipe
    )  # fmt: skip
    p.add_argument("--model", default=None, help="With --token-loss-weight: the store's model (for its tokenizer).")
    p.add_argument("--device", default=None, help="Where the validator trains (e.g. cuda); default cpu.")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--command-text", default=None, help=argparse.SUPPRESS)


def _tokenizer_for(model: str | None) -> Any:
    if not model:
        raise SystemExit("flowcheck train: --token-loss-weight needs --model (the store's model, for its tokenizer).")
    from transformers import AutoTokenizer

    from hf_flowcheck.offline_models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def cmd_train(args: argparse.Namespace) -> int:
    command = (
        "flowcheck " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if args.command_text is None
        else (args.command_text)
    )
    config = config_from_flags(args, TrainConfig)
    _, report = train_from_store(
        args.features,
        args.out,
        config,
        tokenizer=_tokenizer_for(args.model) if config.token_loss_weight else None,
        command=command,
        progress=not args.no_progress,
        device=args.device,
    )
    print(f"Split (seed {report['split']['seed']}): " + ", ".join(f"{k} {report['split'][k]}" for k in SPLIT_NAMES))
    h = report["history"]
    print(
        f"Kept epoch {h['best_epoch']} of {h['epochs_run']} ({h['selection']}): validation loss "
        f"{h['best_val_loss']:.4f}, AUROC {h['best_val_auroc']:.3f}; test results:"
    )
    print(format_table(report["rows"]))
    print(f"Saved the validator to {args.out}")
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--validator", required=True, help="Validator folder or Hub id.")
    p.add_argument("--features", required=True, help="Feature store written by `flowcheck extract`.")
    p.add_argument("--split", choices=[*SPLIT_NAMES, "all"], default="test")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", default=None, help="Also write the results as JSON here.")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hf_flowcheck.detectors.flow_validator import FlowValidator
    from hf_flowcheck.workflows.replay import open_features

    validator = FlowValidator.from_pretrained(args.validator)
    store = open_features(args.features)
    uids = store.uids()
    split = split_records(uids, seed=args.split_seed)
    which = None if args.split == "all" else getattr(split, args.split)
    report = evaluate_validator_on_store(validator, store, which, n_bootstrap=args.bootstrap)
    report["split"] = args.split
    print(f"{args.split} split of {args.features}: {report['n']} samples ({report['protocol']} protocol)")
    print(format_table(report["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        print(f"Wrote {args.json}")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``flowcheck compare`` options (wire with ``set_defaults(func=run_compare)``)."""
    add_model_options(
        parser,
        help="Base model (offline name, folder or Hub id); must be the store's model.",
        dtype="float32",  # gradients need float32 on CPU
    )
    parser.add_argument(
        "--features",
        required=True,
        help="Feature store written by `flowcheck extract`; its uids/labels define the examples.",
    )
    parser.add_argument("--validator", default=None, help="Trained flow validator (folder or Hub id) to include.")
    parser.add_argument("--data-dir", default=None, help="Data directory to reload the records (prompts).")
    parser.add_argument(
        "--detectors",
        default=",".join(registered_detectors()),
        help="Comma-separated subset of the registered detectors (hf_flowcheck.detectors.registry): "
        + "; ".join(f"{k}: {v}" for k, v in registered_detectors().items()),
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="Seed of sketches, readers and sampling.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples of the 95%% intervals.")
    parser.add_argument(
        "--target-risk", type=float, default=0.1, help="Selective-risk target of the abstention policy."
    )
    parser.add_argument("--samples", type=int, default=5, help="Sampling agreement: samples per prompt (>= 2).")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Timed generation and samples: length cap.")
    add_config_flags(
        parser.add_argument_group("gradient detector (GradientConfig fields; --seed seeds it)"),
        GradientConfig, dest_prefix="gradient_", flag_prefix="gradient-", exclude=("seed",),
    )  # fmt: skip
    parser.add_argument(
        "--layer-ablation",
        action="store_true",
        help="Also run the gradient layer ablation (AUROC per 5-block band, cost ratios).",
    )
    parser.add_argument(
        "--max-per-split",
        type=int,
        default=None,
        help="Keep at most this many examples per split (smoke runs; not for reported numbers).",
    )
    parser.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="Keep at most this many training examples (whole records, in the split's seeded order); validation "
        "and test stay whole. Bounds the cost of fitting the trainable detectors; recorded in the report.",
    )
    parser.add_argument(
        "--max-eval",
        type=int,
        default=None,
        help="Keep at most this many validation and this many test examples (whole records, in the split's seeded "
        "order): a seeded subset for the costly detectors (sampling, gradient); recorded in the report.",
    )
    parser.add_argument(
        "--timing-prompts",
        type=int,
        default=32,
        help="Distinct test prompts timed for the plain-generation cost denominator (<= 0: all).",
    )
    parser.add_argument("--json", default=None, help="Write the full report as JSON here.")
    return parser


def _build_detectors(args: argparse.Namespace, tokenizer: Any, protocol: str) -> list[Detector]:
    from hf_flowcheck.detectors.registry import DetectorOptions, build_detectors

    wanted = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if "flow" in wanted and not args.validator:
        print("flowcheck compare: skipping the flow validator (no --validator given)", file=sys.stderr)
    options = DetectorOptions(
        validator=args.validator, tokenizer=tokenizer, protocol=protocol, seed=args.seed, samples=args.samples,
        max_new_tokens=args.max_new_tokens, gradient=_gradient_config(args),
    )  # fmt: skip
    try:
        return build_detectors(wanted, options)
    except ValueError as err:
        raise ValueError(f"--detectors: {err}") from None


def _gradient_config(args: argparse.Namespace) -> GradientConfig:
    """The ``--gradient-*`` flags as a :class:`GradientConfig` seeded by ``--seed``."""
    return config_from_flags(args, GradientConfig, dest_prefix="gradient_", seed=args.seed)


def run_compare(args: argparse.Namespace) -> int:
    """Run ``flowcheck compare``; returns the exit status (0 ok, 2 user error)."""
    from hf_flowcheck.workflows.replay import open_features

    command = "flowcheck " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    store = open_features(args.features)
    model, tokenizer = load_model_from_args(args)
    model.eval()
    if store.model_fingerprint:
        from hf_flowcheck.fingerprint import check_fingerprint

        check_fingerprint(store.model_fingerprint, model, what="feature store")
    examples = examples_from_store(store, tokenizer, data_dir=args.data_dir)
    split = split_records([e.uid for e in examples], seed=args.split_seed)
    split_map: dict[str, Any] = {n: list(split[n]) for n in SPLIT_NAMES}
    if args.max_per_split:
        split_map = {n: _cap(examples, split_map[n], args.max_per_split) for n in SPLIT_NAMES}
    if args.max_train:
        split_map["train"] = _cap(examples, split_map["train"], args.max_train)
    if args.max_eval:
        for name in ("validation", "test"):
            split_map[name] = _cap(examples, split_map[name], args.max_eval)
    detectors = _build_detectors(args, tokenizer, store.protocol)
    report = compare_detectors(
        model,
        tokenizer,
        examples,
        split_map,
        detectors,
        protocol=store.protocol,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        target_risk=args.target_risk,
        timing=GenerationTiming(
            max_new_tokens=args.max_new_tokens,
            prompts=None if args.timing_prompts <= 0 else args.timing_prompts,
            generate_kwargs=(
                {"stopping_criteria": [AnswerLineStop(tokenizer)]}
                # replayed stores hold answers the model generated with this stop (their decoding header)
                if store.protocol in ("generated", "replayed") and supports_answer_line_stop(tokenizer)
                else None
            ),
        ),
        progress=lambda m: print(f"[compare] {m}", file=sys.stderr),
    )
    if args.layer_ablation:
        parts = split_parts(examples, split_map)
        report["layer_ablation"] = gradient_layer_ablation(
            model,
            parts["train"],
            parts["validation"],
            parts["test"],
            config=_gradient_config(args),
            n_bootstrap=min(args.bootstrap, 1000),
            seed=args.seed,
        )
    report["command"] = command
    report["features"] = str(args.features)
    report["caps"] = {"max_per_split": args.max_per_split, "max_train": args.max_train, "max_eval": args.max_eval}
    print(
        f"{store.protocol} protocol, test split of {args.features}: "
        + ", ".join(f"{k} {v}" for k, v in report["sizes"].items())
    )
    cols = ["auroc", "auprc", "precision_at_recall_0.8", "recall_at_precision_0.8", "aurc"]
    print(format_table(report["rows"], metrics=cols))
    print(
        "\ncost per sample as a ratio to plain greedy generation "
        f"({report['generation']['seconds_per_sample'] * 1000:.1f} ms/sample):"
    )
    for name, row in report["rows"].items():
        ab = row["abstention"]["test"]
        risk = "n/a" if ab["risk"] is None else f"{ab['risk']:.3f}"
        print(
            f"  {name}: cost x{row['cost_ratio']:.2f}; abstention at target risk {args.target_risk}: "
            f"test coverage {ab['coverage']:.3f}, risk {risk}"
        )
    for name, why in report["skipped"].items():
        print(f"  skipped {name}: {why}")
    if "layer_ablation" in report:
        la = report["layer_ablation"]
        print(
            f"\ngradient layer ablation: last {la['band']} blocks AUROC {la['last_band']['auroc']}, all blocks "
            f"{la['all']['auroc']}, share {la['share_last_band']}; cost vs one forward: last band "
            f"x{la['cost']['last_band_ratio']:.2f}, all x{la['cost']['all_ratio']:.2f}"
        )
    if args.json:
        from hf_flowcheck.detectors.checkpoint import jsonable

        Path(args.json).write_text(json.dumps(jsonable(report, "report"), indent=2))
        print(f"Wrote {args.json}")
    return 0


def _cap(examples: Sequence[ScoredExample], uids: Sequence[str], limit: int) -> list[str]:
    keep, count = [], 0
    per_uid: dict[str, int] = {}
    for e in examples:
        per_uid[e.uid] = per_uid.get(e.uid, 0) + 1
    for u in uids:
        if count >= limit:
            break
        keep.append(u)
        count += per_uid.get(u, 0)
    return keep


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``answers``, ``replay``, ``extract``, ``train``, ``evaluate`` and ``compare``."""
    from hf_flowcheck.workflows.answers import ANSWER_DATASETS

    ans = sub.add_parser("answers", help="The model's greedy answers into a resumable JSONL (commit it).")
    add_model_options(ans)
    ans.add_argument("--dataset", choices=ANSWER_DATASETS, default="halueval-qa")
    ans.add_argument("--data-dir", default=None, help="Data directory (default: $HF_FLOWCHECK_DATA or bundled).")
    ans.add_argument("--out", required=True, help="The JSONL to create or resume.")
    ans.add_argument(
        "--limit", type=positive_int, default=None, help="Answer the first LIMIT records of the permutation."
    )
    ans.add_argument("--seed", type=int, default=0, help="Seed of the record permutation.")
    add_config_flags(
        ans.add_argument_group("decoding (AnswerDecoding fields)"), AnswerDecoding, dest_prefix="decoding_",
        exclude=("generate_kwargs", "description"),
    )  # fmt: skip
    ans.set_defaults(func=run_answers)

    from hf_flowcheck.data.corpus import CORPUS_TASKS

    cp = sub.add_parser(
        "corpus", help="The model's own answers in every corpus task and prompt style (resumable; commit it)."
    )
    add_model_options(cp)
    cp.add_argument("--out", required=True, help="The corpus folder to create or resume.")
    cp.add_argument("--tasks", nargs="+", choices=tuple(CORPUS_TASKS), default=None, help="Default: all.")
    cp.add_argument("--per-cell", type=positive_int, default=100, help="Answers per (task, style) cell to reach.")
    cp.add_argument("--per-round", type=positive_int, default=8, help="Answers added to every cell per round.")
    cp.add_argument("--batch-size", type=positive_int, default=8)
    cp.add_argument("--seed", type=int, default=0, help="Seed of the record permutation.")
    cp.add_argument("--data-dir", default=None, help="Data directory (default: $HF_FLOWCHECK_DATA or bundled).")
    cp.set_defaults(func=run_corpus)

    rp = sub.add_parser("replay", help="Teacher-forced flow features of an answers file (part stores).")
    add_model_options(rp, help="The model that wrote the answers.")
    rp.add_argument("--answers", required=True, help="JSONL from `flowcheck answers`.")
    rp.add_argument("--out", required=True, help="Root folder of the part stores (resumable).")
    rp.add_argument("--part-size", type=positive_int, default=500)
    rp.add_argument("--batch-size", type=positive_int, default=8)
    rp.add_argument("--lens-features", action=argparse.BooleanOptionalAction, default=True)
    rp.add_argument(
        "--lens-candidates",
        type=int,
        default=0,
        help="0: exact lens channels (full-vocabulary readout per token and block); K: within each token's top K "
        "of the last block's readout (FlowConfig.lens_candidates, ~B times cheaper, an approximation).",
    )
    rp.add_argument(
        "--competitor-candidates",
        type=int,
        default=0,
        help="0: rank each (token, block)'s competitors over the whole vocabulary (the spec); C: within the union "
        "of the answer tokens' top C of the last block's readout (FlowConfig.competitor_candidates: other "
        "features than the spec's; a validator must be trained on them).",
    )
    rp.add_argument(
        "--state-summary",
        choices=STATE_SUMMARIES,
        default="last",
        help="What the store keeps beside the signatures for flow + state validators (FlowConfig.state_summary).",
    )
    rp.add_argument(
        "--start-part", type=int, default=0, help="First part to extract (another process may take the earlier ones)."
    )
    rp.add_argument("--skip-started", action="store_true", help="Leave parts another process has started.")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=run_replay)

    ext = sub.add_parser("extract", help="Extract flow signatures of a dataset into resumable safetensors shards.")
    add_extract_arguments(ext)
    ext.set_defaults(func=run_extract)

    train = sub.add_parser("train", help="Train a flow validator on a feature store (validation-selected).")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("evaluate", help="Evaluate a validator on a split of a feature store.")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    compare = sub.add_parser("compare", help="Every detector on the same model, data and split, with 95%% intervals.")
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare)
