"""Commands that generate with flow checking: ``demo``, ``generate``, ``report``."""

from __future__ import annotations

import argparse
import sys
import time

from hf_flowcheck.cli.options import THRESHOLD_HELP, add_model_options, model_load_kwargs, positive_int, unit_interval
from hf_flowcheck.data.corpus import GENERATION_CAPS, PROMPT_STYLES

__all__ = [
    "CLI_PROMPT_STYLES",
    "DEMO_SAMPLES",
    "VERDICT_POINT",
    "register",
]


SAMPLE_KNOWLEDGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889."
)
SAMPLE_QUESTION = "Which engineer is the Eiffel Tower named after?"

#: Prompt styles of ``--prompt-style``: the corpus's five, and ``halueval``, the HaluEval-QA two-shot
#: prompt with a passage that the ``*-halueval-qa`` validators were trained on.
CLI_PROMPT_STYLES: tuple[str, ...] = (*PROMPT_STYLES, "halueval")

#: The operating point behind the printed verdict when no ``--threshold`` is given: at the corpus's
#: base rate (about 80% of a 135M model's closed-book answers are wrong) precision 0.8 flags almost
#: everything, so the verdict asks for 0.9.
VERDICT_POINT = "precision_0.9"

#: (question, knowledge, reference answer, prompt style) shown by ``flowcheck demo``: a closed-book
#: question asked through the chat template, as people ask an Instruct model; then the first
#: HaluEval-QA test-split questions (split seed 0, answers-file order) that SmolLM2-135M-Instruct
#: answered right (halueval_qa:4881) and wrong (halueval_qa:9022) in its two-shot prompt, taken as
#: they came, not for their scores, asked here in the corpus's plain two-shot style.
DEMO_SAMPLES: list[tuple[str, str | None, str | None, str]] = [
    ("Which engineer is the Eiffel Tower named after?", None, "Gustave Eiffel", "chat"),
    (
        ' Who flew on a 1985 Space Shuttle "Challenger" mission as a Payload Specialist, Claude Nicollier or  '
        "Lodewijk van den Berg?",
        "Claude Nicollier (born 2 September 1944 in Vevey, Switzerland) is the first astronaut from Switzerland."
        "Lodewijk van den Berg (] ; born March 24, 1932) is a Dutch American chemical engineer, specializing in "
        'crystal growth, who flew on a 1985 Space Shuttle "Challenger" mission as a Payload Specialist.',
        "Lodewijk van den Berg",
        "plain-fewshot",
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
        "plain-fewshot",
    ),
]


def _print_culprit_depth_profile(out, row: int = 0, stream=sys.stdout, top_blocks: int = 5) -> None:
    """Per block: the culprit token's event score and features (the depth profile behind the flag)."""
    feats = out.flow_features
    pos = int(out.flow_culprits[row, 0])
    cols = (feats.positions[row] == pos).nonzero()
    if cols.numel() == 0:
        return
    col = int(cols[0])
    names = feats.names
    ev = out.flow_event_scores[row, :, col].sigmoid()
    block = int(out.flow_culprits[row, 1])
    top = sorted(range(feats.values.shape[1]), key=lambda b: -float(ev[b]))[:top_blocks]
    width = max(len(n) for n in names)
    print(
        f"\nDepth profile of the culprit token: its {len(top)} highest-scoring blocks of {feats.values.shape[1]} "
        "(event score = sigmoid of the validator's event logit)",
        file=stream,
    )
    print(
        f"{'feature':<{width}} " + " ".join(f"{'b' + str(b) + ('*' if b == block else ''):>8}" for b in top),
        file=stream,
    )
    print(f"{'event score':<{width}} " + " ".join(f"{float(ev[b]):8.3f}" for b in top), file=stream)
    for j, name in enumerate(names):
        print(f"{name:<{width}} " + " ".join(f"{float(feats.values[row, b, col, j]):8.3f}" for b in top), file=stream)
    print("(* = the culprit block; flowcheck generate --depth-profile prints this for any question)", file=stream)


def cmd_demo(args: argparse.Namespace) -> int:
    """``make demo``: flow-checked answers on the bundled model -- one chat question, two HaluEval-QA ones.

    The HaluEval-QA two are the first test-split questions (split seed 0, answers file order) that
    SmolLM2 answered right and wrong: they show what a score looks like on each, not a chosen success.
    """
    import transformers

    transformers.logging.set_verbosity_error()  # the demo prints its answers, not library chatter
    transformers.logging.disable_progress_bar()
    args.validator = None
    args.raw_prompt = False
    args.depth_profile = True
    model = _load_checked(args)
    if model is None:
        return 2
    if args.question is None:
        samples = DEMO_SAMPLES
    else:
        samples = [(args.question, args.context, None, args.prompt_style or _default_style(model.tokenizer))]
    heatmap = args.heatmap
    for i, (question, context, reference, style) in enumerate(samples):
        if i:
            print("\n" + "-" * 72 + "\n")
        args.heatmap = heatmap if i == len(samples) - 1 else ""
        args.prompt_style = style
        _answer(model, question, context, args, reference=reference)
    return 0


def _load_checked(args: argparse.Namespace):
    from hf_flowcheck import FlowCheckedModelForCausalLM

    t0 = time.perf_counter()
    kwargs = {} if args.validator is None else {"validator": args.validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, **kwargs, **model_load_kwargs(args))
    if model.validator is None:
        print(
            f"flowcheck {args.command}: error: no validator for {args.model}. Pass --validator FOLDER_OR_HUB_ID "
            "(train one with `flowcheck answers`, `flowcheck replay` and `flowcheck train`).",
            file=sys.stderr,
        )
        return None
    print(f"Loaded {args.model} with its validator in {time.perf_counter() - t0:.1f} s")
    return model


def _default_style(tok) -> str:
    """How people prompt the model: through its chat template when it has one."""
    return "chat" if getattr(tok, "chat_template", None) else "plain-fewshot"


def _prompt(tok, question: str, context: str | None, style: str) -> str:
    """``question`` (with its passage) in prompt style ``style`` (:data:`CLI_PROMPT_STYLES`)."""
    from hf_flowcheck.data import Example, generation_prompt
    from hf_flowcheck.data.corpus import corpus_prompt

    if not question.strip():
        raise ValueError("the question is empty; pass the question to answer.")
    if style == "halueval":
        fields = {"knowledge": context or "", "question": question}
        return generation_prompt(Example(uid="cli", task="qa", prompt_fields=fields))
    fields = {"question": question, **({"knowledge": context} if context else {})}
    return corpus_prompt(Example(uid="cli", task="qa", prompt_fields=fields), style, tok)


def _warn_format(validator, style: str, context: str | None, *, raw_prompt: bool) -> None:
    """Say when the prompt is not one the validator was trained on (its score means less there)."""
    trained = (getattr(validator, "training_metadata", None) or {}).get("prompt_styles")
    if raw_prompt:
        why = "--raw-prompt sends your text as it is"
    elif trained is not None:
        if style in trained:
            return
        why = f"this validator was trained on the prompt styles {', '.join(trained)}, not {style!r}"
    elif style == "halueval" and (context or "").strip():
        return
    else:
        why = (
            "this validator was trained on HaluEval-QA two-shot prompts with a passage (--prompt-style halueval "
            "--context PASSAGE)"
        )
    print(
        f"Warning: {why}. Outside its training formats a validator's score is a weak ranking, not a probability "
        "(docs/results.md: 'Transfer across prompt styles and tasks').",
        file=sys.stderr,
    )


def _threshold(validator, style: str, given: float | None) -> tuple[float, str]:
    if given is not None:
        return given, "--threshold"
    try:
        t = validator.recommended_threshold(VERDICT_POINT, prompt_style=style)
        return t, f"{VERDICT_POINT} on validation answers of style {style!r}; --threshold to change"
    except ValueError:
        # Uncalibrated validators are trained with the class weight n_neg/n_pos: 0.5 is their balanced point.
        return 0.5, "balanced point; --threshold to change"


def cmd_generate(args: argparse.Namespace) -> int:
    """Flow-checked generation: answer, score, culprit, heatmap."""
    model = _load_checked(args)
    if model is None:
        return 2
    return _answer(model, args.question, args.context, args)


def _answer(model, question: str, context: str | None, args: argparse.Namespace, reference: str | None = None) -> int:
    from hf_flowcheck.stopping import AnswerLineStop

    tok = model.tokenizer
    style = args.prompt_style or _default_style(tok)
    prompt = question if args.raw_prompt else _prompt(tok, question, context, style)
    if not prompt.strip():
        raise ValueError("the question is empty; pass the question to answer.")
    _warn_format(model.validator, style, context, raw_prompt=args.raw_prompt)
    enc = tok(prompt, return_tensors="pt")  # as the corpus encoded its prompts
    chat = style.startswith("chat") and not args.raw_prompt
    max_new = args.max_new_tokens or GENERATION_CAPS["chat" if chat else "plain"]
    t0 = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=max_new,
        do_sample=False,
        return_flow_scores=True,
        return_flow_features=True,
        # plain prompts: the answer line only (past it the model writes an invented next question);
        # chat prompts end at the model's own end of turn
        stopping_criteria=None if args.raw_prompt or chat else [AnswerLineStop(tok, enc.input_ids.shape[1])],
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    dt = time.perf_counter() - t0
    p = enc.input_ids.shape[1]
    answer = tok.decode(out.sequences[0, p:], skip_special_tokens=True).strip()
    print(f"Question: {question}" + ("" if args.raw_prompt else f"   [prompt style: {style}]"))
    print(f"Answer:   {answer}")
    if reference is not None:
        print(f"Reference answer: {reference}")
    score = float(out.flow_scores[0])
    if not bool(out.flow_has_events[0]):
        print("Flow score: n/a (the answer has no scored token)")
        return 0
    threshold, source = _threshold(model.validator, style, args.threshold)
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
    from hf_flowcheck.stopping import AnswerLineStop

    kwargs = {} if args.validator is None else {"validator": args.validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, **kwargs, **model_load_kwargs(args))
    if model.validator is None:
        print(f"flowcheck report: error: no validator for {args.model}; pass --validator.", file=sys.stderr)
        return 2
    tok = model.tokenizer
    tok.padding_side = "left"
    style = args.prompt_style or _default_style(tok)
    chat = style.startswith("chat")
    prompts = [_prompt(tok, q, args.context, style) for q in args.questions]
    enc = tok(prompts, return_tensors="pt", padding=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _warn_format(model.validator, style, args.context, raw_prompt=False)
    out = model.generate(
        **enc,
        max_new_tokens=args.max_new_tokens or GENERATION_CAPS["chat" if chat else "plain"],
        do_sample=False,
        return_flow_scores=True,
        return_flow_features=True,
        # plain prompts: the answer line only -- without the stop the model writes an invented next
        # question, and it is scored; chat prompts end at the model's end of turn
        stopping_criteria=None if chat else [AnswerLineStop(tok, enc.input_ids.shape[1])],
        pad_token_id=pad,
    )
    refined = None
    if args.refine:
        refined = model.refine(out, threshold=0.0, attention_mask=enc.attention_mask, pad_token_id=pad)
    items = report_items_from_output(out, tok, prompts=list(args.questions), refinements=refined)
    render_report(items, args.out, subtitle=f"{args.model}, greedy, prompt style {style}")
    print(f"Wrote {args.out} ({len(items)} generation(s); open it in a browser)")
    return 0


STYLE_HELP = (
    "How the question is asked: one of the corpus prompt styles (default: 'chat', the tokenizer's chat template, "
    "or 'plain-fewshot' for a model without one) or 'halueval' (the HaluEval-QA two-shot prompt with --context)."
)
MAX_NEW_HELP = "Most new tokens (default: 64 for chat styles, which end at the model's end of turn; 24 for plain ones)."


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``generate`` and ``report`` to the ``flowcheck`` subcommands."""
    demo = sub.add_parser("demo", help="Flow-checked generation of a sample question on the bundled model.")
    add_model_options(demo)
    demo.add_argument("--question", default=None, help="Ask this instead of the two sample questions.")
    demo.add_argument("--context", default=None)
    demo.add_argument("--prompt-style", choices=CLI_PROMPT_STYLES, default=None, help=STYLE_HELP)
    demo.add_argument("--max-new-tokens", type=positive_int, default=None, help=MAX_NEW_HELP)
    demo.add_argument("--threshold", type=unit_interval, default=None, help=THRESHOLD_HELP)
    demo.add_argument("--heatmap", default="flowcheck_heatmap.png", help="PNG path ('' to skip).")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="Answer a question with flow checking: score, culprit and heatmap.")
    gen.add_argument("question")
    gen.add_argument("--context", default=None, help="Knowledge passage the answer should rest on.")
    add_model_options(gen)
    gen.add_argument("--validator", default=None, help="Validator folder or Hub id (default: the bundled one).")
    gen.add_argument("--prompt-style", choices=CLI_PROMPT_STYLES, default=None, help=STYLE_HELP)
    gen.add_argument("--max-new-tokens", type=positive_int, default=None, help=MAX_NEW_HELP)
    gen.add_argument("--threshold", type=unit_interval, default=None, help=THRESHOLD_HELP)
    gen.add_argument("--heatmap", default="flowcheck_heatmap.png", help="PNG path ('' to skip).")
    gen.add_argument("--raw-prompt", action="store_true", help="Use the question as the whole prompt.")
    gen.add_argument(
        "--depth-profile", action="store_true", help="Print the culprit token's event scores and features by block."
    )
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("report", help="Write a self-contained HTML report of flow-checked generations.")
    rep.add_argument("questions", nargs="+")
    rep.add_argument("--context", default=None, help="Knowledge passage shared by the questions.")
    add_model_options(rep)
    rep.add_argument("--validator", default=None, help="Validator folder or Hub id (default: the bundled one).")
    rep.add_argument("--prompt-style", choices=CLI_PROMPT_STYLES, default=None, help=STYLE_HELP)
    rep.add_argument("--max-new-tokens", type=positive_int, default=None, help=MAX_NEW_HELP)
    rep.add_argument("--refine", action="store_true", help="Also refine each answer and show before/after.")
    rep.add_argument("--out", default="flowcheck_report.html")
    rep.set_defaults(func=cmd_report)
