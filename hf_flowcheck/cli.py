"""The ``flowcheck`` command."""

from __future__ import annotations

import argparse
import sys
import time

SAMPLE_KNOWLEDGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889."
)
SAMPLE_QUESTION = "Which engineer is the Eiffel Tower named after?"

#: (question, knowledge, reference answer) shown by ``flowcheck demo``: the first HaluEval-QA
#: test-split questions (split seed 0, answers-file order) that SmolLM2-135M-Instruct answered
#: right (halueval_qa:4881) and wrong (halueval_qa:9022), taken as they came, not for their scores.
DEMO_SAMPLES: list[tuple[str, str | None, str | None]] = [
    (
        ' Who flew on a 1985 Space Shuttle "Challenger" mission as a Payload Specialist, Claude Nicollier or  '
        "Lodewijk van den Berg?",
        "Claude Nicollier (born 2 September 1944 in Vevey, Switzerland) is the first astronaut from Switzerland."
        "Lodewijk van den Berg (] ; born March 24, 1932) is a Dutch American chemical engineer, specializing in "
        'crystal growth, who flew on a 1985 Space Shuttle "Challenger" mission as a Payload Specialist.',
        "Lodewijk van den Berg",
    ),
    (
        "Which brand, originally developed by Procter & Gamble, is now owned by a company headquartered in Battle "
        "Creek, Michigan, United States?",
        "The Kellogg Company (also Kellogg's, Kellogg, and Kellogg's of Battle Creek) is an American multinational "
        "food manufacturing company headquartered in Battle Creek, Michigan, United States. The company's brands "
        "include Froot Loops, Apple Jacks, Corn Flakes, Frosted Flakes, Rice Krispies, Special K, Cocoa Krispies, "
        "Keebler, Pringles, Pop-Tarts, Kashi, Cheez-It, Eggo, Nutri-Grain, Morningstar Farms, and many more."
        "Pringles is an American brand of potato and wheat-based stackable snack chips owned by Kellogg's. "
        'Originally marketed as "Pringle\'s Newfangled Potato Chips", Pringles are sold in more than 140 countries, '
        "and it was the fourth most popular snack brand after Lay's, Doritos and Cheetos in 2012, with 2.2% market "
        "share globally, compared to Lay's share of 6.7%. The snack was originally developed by Procter & Gamble "
        "(P&G), who first sold the product in 1967.",
        "Pringles",
    ),
]


def _print_culprit_depth_profile(out, row: int = 0, stream=sys.stdout) -> None:
    """Per block: the culprit token's event score and features (the depth profile behind the flag)."""
    feats = out.flow_features
    pos = int(out.flow_culprits[row, 0])
    cols = (feats.positions[row] == pos).nonzero()
    if cols.numel() == 0:
        return
    col = int(cols[0])
    names = feats.names
    print("\nDepth profile of the culprit token (event score = sigmoid of the validator's event logit):", file=stream)
    print("block  event " + " ".join(f"{n[:11]:>11}" for n in names), file=stream)
    ev = out.flow_event_scores[row, :, col].sigmoid()
    block = int(out.flow_culprits[row, 1])
    for b in range(feats.values.shape[1]):
        mark = " <- culprit" if b == block else ""
        vals = " ".join(f"{float(x):11.4f}" for x in feats.values[row, b, col])
        print(f"{b:5d} {float(ev[b]):6.3f} {vals}{mark}", file=stream)


def cmd_demo(args: argparse.Namespace) -> int:
    """``make demo``: flow-checked answers to two HaluEval-QA test questions on the bundled model.

    The two are the first test-split questions (split seed 0, answers file order) that SmolLM2
    answered right and wrong: they show what a score looks like on each, not a chosen success.
    """
    args.validator = None
    args.raw_prompt = False
    args.depth_profile = True
    model = _load_checked(args)
    if model is None:
        return 2
    samples = DEMO_SAMPLES if args.question is None else [(args.question, args.context, None)]
    heatmap = args.heatmap
    for i, (question, context, reference) in enumerate(samples):
        if i:
            print("\n" + "-" * 72 + "\n")
        args.heatmap = heatmap if i == len(samples) - 1 else ""
        _answer(model, question, context, args, reference=reference)
    return 0


def _load_checked(args: argparse.Namespace):
    from hf_flowcheck import FlowCheckedModelForCausalLM

    t0 = time.perf_counter()
    kwargs = {} if args.validator is None else {"validator": args.validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, **kwargs)
    if model.validator is None:
        print(
            f"flowcheck {args.command}: error: no validator for {args.model}. Pass --validator FOLDER_OR_HUB_ID "
            "(train one with `flowcheck answers`, `flowcheck replay` and `flowcheck train`).",
            file=sys.stderr,
        )
        return None
    print(f"Loaded {args.model} with its validator in {time.perf_counter() - t0:.1f} s")
    return model


def _qa_prompt(question: str, context: str | None) -> str:
    """The same 2-shot plain prompt the bundled validator's training answers were generated with."""
    from hf_flowcheck.data import Example, generation_prompt

    fields = {"knowledge": context or "", "question": question}
    return generation_prompt(Example(uid="cli", task="qa", prompt_fields=fields))


def cmd_generate(args: argparse.Namespace) -> int:
    """Flow-checked generation: answer, score, culprit, heatmap."""
    model = _load_checked(args)
    if model is None:
        return 2
    return _answer(model, args.question, args.context, args)


def _answer(model, question: str, context: str | None, args: argparse.Namespace, reference: str | None = None) -> int:
    from hf_flowcheck.stopping import AnswerLineStop

    tok = model.tokenizer
    prompt = _qa_prompt(question, context) if not args.raw_prompt else question
    if not prompt.strip():
        raise ValueError("the question is empty; pass the question to answer.")
    enc = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        return_flow_scores=True,
        return_flow_features=True,
        stopping_criteria=None if args.raw_prompt else [AnswerLineStop(tok, enc.input_ids.shape[1])],
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    dt = time.perf_counter() - t0
    p = enc.input_ids.shape[1]
    answer = tok.decode(out.sequences[0, p:], skip_special_tokens=True).strip()  # the first non-empty line
    print(f"Question: {question}")
    print(f"Answer:   {answer}")
    if reference is not None:
        print(f"Reference answer (HaluEval): {reference}")
    score = float(out.flow_scores[0])
    if not bool(out.flow_has_events[0]):
        print("Flow score: n/a (the answer has no scored token)")
        return 0
    threshold, source = args.threshold, "--threshold"
    if threshold is None:
        # Validators are trained with the class weight n_neg/n_pos, so 0.5 is their balanced decision point.
        threshold, source = 0.5, "balanced point; --threshold to change"
    verdict = "likely hallucinated" if score > threshold else "looks grounded"
    print(
        f"Flow score: {score:.3f} ({verdict}; higher = more likely hallucinated; threshold {threshold:.3f}, {source})"
    )
    pos, block = (int(x) for x in out.flow_culprits[0])
    print(f"Culprit:  token {tok.decode(out.sequences[0, pos])!r} at position {pos - p} of the answer, block {block}")
    print(f"Generated and scored in {dt:.2f} s")
    if getattr(args, "depth_profile", False):
        _print_culprit_depth_profile(out)
    if args.heatmap:
        try:
            from hf_flowcheck.report import report_items_from_output, save_heatmap_png

            item = report_items_from_output(out, tok, prompts=[prompt])[0]
            save_heatmap_png(item, args.heatmap)
            print(f"Wrote the depth x token heatmap of event scores to {args.heatmap}")
        except ImportError as err:
            print(f"(no heatmap: {err}; pip install matplotlib)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Flow-checked generation of one or more questions, optionally refined, as a self-contained HTML page."""
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.report import render_report, report_items_from_output

    kwargs = {} if args.validator is None else {"validator": args.validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, **kwargs)
    if model.validator is None:
        print(f"flowcheck report: error: no validator for {args.model}; pass --validator.", file=sys.stderr)
        return 2
    tok = model.tokenizer
    tok.padding_side = "left"
    prompts = [_qa_prompt(q, args.context) for q in args.questions]
    enc = tok(prompts, return_tensors="pt", padding=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        return_flow_scores=True,
        return_flow_features=True,
        pad_token_id=pad,
    )
    refined = None
    if args.refine:
        refined = model.refine(out, threshold=0.0, attention_mask=enc.attention_mask, pad_token_id=pad)
    items = report_items_from_output(out, tok, prompts=list(args.questions), refinements=refined)
    render_report(items, args.out, subtitle=f"{args.model}, greedy, {args.max_new_tokens} new tokens")
    print(f"Wrote {args.out} ({len(items)} generation(s); open it in a browser)")
    return 0


THRESHOLD_HELP = (
    "Score above which the answer is called likely hallucinated, in [0, 1] (default 0.5, the balanced point of a "
    "class-weighted validator; its model card lists thresholds chosen on validation)."
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that names the allowed values."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass a positive integer.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; pass an integer >= 1.")
    return value


DTYPES = ("float32", "bfloat16", "float16")

#: What the command line answers with a one-line message and exit status 2 (no traceback).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, OSError)


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a threshold in [0, 1].") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]; pass a threshold in [0, 1].")
    return value


def build_parser() -> argparse.ArgumentParser:
    from hf_flowcheck.offline_models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="flowcheck", description="Flow signatures for HuggingFace causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Flow-checked generation of a sample question on the bundled model.")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="Offline model name, local folder or Hub id.")
    demo.add_argument("--question", default=None, help="Ask this instead of the two sample questions.")
    demo.add_argument("--context", default=None)
    demo.add_argument("--max-new-tokens", type=positive_int, default=32)
    demo.add_argument("--threshold", type=_unit_interval, default=None, help=THRESHOLD_HELP)
    demo.add_argument("--heatmap", default="flowcheck_heatmap.png", help="PNG path ('' to skip).")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="Answer a question with flow checking: score, culprit and heatmap.")
    gen.add_argument("question")
    gen.add_argument("--context", default=None, help="Knowledge passage the answer should rest on.")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="Offline model name, local folder or Hub id.")
    gen.add_argument("--validator", default=None, help="Validator folder or Hub id (default: the bundled one).")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32)
    gen.add_argument("--threshold", type=_unit_interval, default=None, help=THRESHOLD_HELP)
    gen.add_argument("--heatmap", default="flowcheck_heatmap.png", help="PNG path ('' to skip).")
    gen.add_argument("--raw-prompt", action="store_true", help="Use the question as the whole prompt.")
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("report", help="Write a self-contained HTML report of flow-checked generations.")
    rep.add_argument("questions", nargs="+")
    rep.add_argument("--context", default=None, help="Knowledge passage shared by the questions.")
    rep.add_argument("--model", default=DEFAULT_MODEL)
    rep.add_argument("--validator", default=None, help="Validator folder or Hub id (default: the bundled one).")
    rep.add_argument("--max-new-tokens", type=positive_int, default=24)
    rep.add_argument("--refine", action="store_true", help="Also refine each answer and show before/after.")
    rep.add_argument("--out", default="flowcheck_report.html")
    rep.set_defaults(func=cmd_report)

    from hf_flowcheck.workflows.answers import ANSWER_DATASETS, run_answers

    ans = sub.add_parser("answers", help="The model's greedy answers into a resumable JSONL (commit it).")
    ans.add_argument("--model", default=DEFAULT_MODEL, help="Offline model name, local folder or Hub id.")
    ans.add_argument("--dataset", choices=ANSWER_DATASETS, default="halueval-qa")
    ans.add_argument("--data-dir", default=None, help="Data directory (default: $HF_FLOWCHECK_DATA or bundled).")
    ans.add_argument("--out", required=True, help="The JSONL to create or resume.")
    ans.add_argument(
        "--limit", type=positive_int, default=None, help="Answer the first LIMIT records of the permutation."
    )
    ans.add_argument("--seed", type=int, default=0, help="Seed of the record permutation.")
    ans.add_argument("--batch-size", type=positive_int, default=16)
    ans.add_argument("--max-new-tokens", type=positive_int, default=32)
    ans.set_defaults(func=run_answers)

    from hf_flowcheck.workflows.replay import run_replay

    rp = sub.add_parser("replay", help="Teacher-forced flow features of an answers file (part stores).")
    rp.add_argument("--model", default=DEFAULT_MODEL, help="The model that wrote the answers.")
    rp.add_argument("--answers", required=True, help="JSONL from `flowcheck answers`.")
    rp.add_argument("--out", required=True, help="Root folder of the part stores (resumable).")
    rp.add_argument("--part-size", type=positive_int, default=500)
    rp.add_argument("--batch-size", type=positive_int, default=8)
    rp.add_argument("--lens-features", action=argparse.BooleanOptionalAction, default=True)
    rp.add_argument("--state-summary", choices=["last", "mean", "none"], default="last")
    rp.add_argument("--start-part", type=int, default=0, help="First part to extract (another process may take the earlier ones).")
    rp.add_argument("--skip-started", action="store_true", help="Leave parts another process has started.")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=run_replay)

    from hf_flowcheck.pipeline import add_extract_arguments, run_extract

    ext = sub.add_parser("extract", help="Extract flow signatures of a dataset into resumable safetensors shards.")
    add_extract_arguments(ext)
    ext.set_defaults(func=run_extract)

    from hf_flowcheck.experiments import add_evaluate_arguments, add_train_arguments, cmd_evaluate, cmd_train

    train = sub.add_parser("train", help="Train a flow validator on a feature store (validation-selected).")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("evaluate", help="Evaluate a validator on a split of a feature store.")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    from hf_flowcheck.comparison import add_compare_arguments, run_compare

    compare = sub.add_parser("compare", help="Every detector on the same model, data and split, with 95%% intervals.")
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``flowcheck`` command; a user error prints one line and returns 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"flowcheck {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
