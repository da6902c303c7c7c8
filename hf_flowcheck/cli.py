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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
