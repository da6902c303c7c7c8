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


def _print_depth_summary(feats, row: int = 0, out=sys.stdout) -> None:
    """Mean of each feature over the row's tokens, one line per block."""
    names = feats.names
    vals = feats.values[row]  # [B, T, F]
    valid = feats.valid[row]  # [B, T]
    n_tok = int(valid[0].sum()) if valid.numel() else 0
    if n_tok == 0:
        print("(no scored tokens: the answer was empty or only special tokens)", file=out)
        return
    short = [n[:10] for n in names]
    print("block " + " ".join(f"{s:>10}" for s in short), file=out)
    for b in range(vals.shape[0]):
        mean = vals[b, :n_tok].mean(0)
        print(f"{b:5d} " + " ".join(f"{float(x):10.4f}" for x in mean), file=out)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from hf_flowcheck import FlowConfig, FlowExtractor
    from hf_flowcheck.offline_models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(
        f"Loaded {args.model} ({model.config.model_type}, {model.config.num_hidden_layers} blocks) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    prompt = f"Knowledge: {args.context}\nQuestion: {args.question}\nAnswer:"
    enc = tok(prompt, return_tensors="pt")
    ext = FlowExtractor(model, FlowConfig(), tokenizer=tok)
    t0 = time.perf_counter()
    seqs, feats = ext.generate(
        enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    dt = time.perf_counter() - t0
    answer = tok.decode(seqs[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"Question: {args.question}\nAnswer: {answer.strip()}")
    print(
        f"Flow signatures of {int(feats.num_tokens()[0])} answer tokens x {feats.num_blocks} blocks x "
        f"{len(feats.names)} features, generated and extracted in {dt:.2f} s:"
    )
    _print_depth_summary(feats)
    with torch.no_grad():
        step = feats.values[0, :, : int(feats.num_tokens()[0]), 0]
    if step.numel():
        b, t = divmod(int(step.argmax()), step.shape[1])
        pos = int(feats.positions[0, t])
        print(f"Largest transported step: block {b}, token {tok.decode(seqs[0, pos])!r} (position {pos}).")
    return 0


def _qa_prompt(question: str, context: str | None) -> str:
    """The same 2-shot plain prompt the bundled validator's training answers were generated with."""
    from hf_flowcheck.data import Example, generation_prompt

    fields = {"knowledge": context or "", "question": question}
    return generation_prompt(Example(uid="cli", task="qa", prompt_fields=fields))


def cmd_generate(args: argparse.Namespace) -> int:
    """Flow-checked generation: answer, score, culprit, heatmap."""
    from hf_flowcheck import FlowCheckedModelForCausalLM

    t0 = time.perf_counter()
    kwargs = {} if args.validator is None else {"validator": args.validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, **kwargs)
    tok = model.tokenizer
    if model.validator is None:
        print(
            f"flowcheck generate: error: no validator for {args.model}. Pass --validator FOLDER_OR_HUB_ID "
            "(train one with `flowcheck extract` + `flowcheck train`).",
            file=sys.stderr,
        )
        return 2
    print(f"Loaded {args.model} with its validator in {time.perf_counter() - t0:.1f} s")
    prompt = _qa_prompt(args.question, args.context) if not args.raw_prompt else args.question
    enc = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        return_flow_scores=True,
        return_flow_features=True,
        stop_strings=["\n"] if not args.raw_prompt else None,
        tokenizer=tok,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    dt = time.perf_counter() - t0
    p = enc.input_ids.shape[1]
    answer = tok.decode(out.sequences[0, p:], skip_special_tokens=True).strip()
    print(f"Question: {args.question}")
    print(f"Answer:   {answer}")
    score = float(out.flow_scores[0])
    if not bool(out.flow_has_events[0]):
        print("Flow score: n/a (the answer has no scored token)")
        return 0
    verdict = "likely hallucinated" if score > args.threshold else "looks grounded"
    print(f"Flow score: {score:.3f} ({verdict}; higher = more likely hallucinated; threshold {args.threshold})")
    pos, block = (int(x) for x in out.flow_culprits[0])
    print(f"Culprit:  token {tok.decode(out.sequences[0, pos])!r} at position {pos - p} of the answer, block {block}")
    print(f"Generated and scored in {dt:.2f} s")
    if args.heatmap:
        try:
            from hf_flowcheck.report import report_items_from_output, save_heatmap_png

            item = report_items_from_output(out, tok, prompts=[prompt])[0]
            save_heatmap_png(item, args.heatmap)
            print(f"Wrote the depth x token heatmap of event scores to {args.heatmap}")
        except ImportError as err:
            print(f"(no heatmap: {err}; pip install matplotlib)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hf_flowcheck.offline_models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="flowcheck", description="Flow signatures for HuggingFace causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Generate an answer on the bundled model and summarise its flow signatures.")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="Offline model name, local folder or Hub id.")
    demo.add_argument("--question", default=SAMPLE_QUESTION)
    demo.add_argument("--context", default=SAMPLE_KNOWLEDGE)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="Answer a question with flow checking: score, culprit and heatmap.")
    gen.add_argument("question")
    gen.add_argument("--context", default=None, help="Knowledge passage the answer should rest on.")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="Offline model name, local folder or Hub id.")
    gen.add_argument("--validator", default=None, help="Validator folder or Hub id (default: the bundled one).")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--threshold", type=float, default=0.5)
    gen.add_argument("--heatmap", default="flowcheck_heatmap.png", help="PNG path ('' to skip).")
    gen.add_argument("--raw-prompt", action="store_true", help="Use the question as the whole prompt.")
    gen.set_defaults(func=cmd_generate)

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

    compare = sub.add_parser("compare", help="Every detector on the same model, data and split, with 95% intervals.")
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
