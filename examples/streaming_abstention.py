"""Score an answer while it is generated, and abstain when the running score gets too high.

    python examples/streaming_abstention.py [--validator FOLDER_OR_HUB_ID] [--threshold 0.8]

Every ``--check-every`` generated tokens each row's answer so far is scored from the states already
captured (no extra forward pass). A row above ``--threshold`` stops and ends with "I am not sure.".
Without a trained validator this uses a RANDOMLY INITIALISED one (it says so; its running scores
hover around 0.55, so try ``--threshold 0.5`` to see a row abstain); the numbers then only
demonstrate the mechanics.
"""

from __future__ import annotations

import argparse

import torch

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowValidator, ValidatorConfig

QUESTIONS = [
    "Question: Which city is the capital of France?\nAnswer:",
    "Question: Who was the first person to walk on the planet Mars?\nAnswer:",
]


def load(base: str, validator: str | None) -> FlowCheckedModelForCausalLM:
    kwargs = {} if validator is None else {"validator": validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(base, **kwargs)
    if model.validator is None:
        print("NOTE: no trained validator (none bundled, none given): using a RANDOMLY INITIALISED validator.\n")
        cfg = model.flow_config
        torch.manual_seed(0)
        v = FlowValidator(ValidatorConfig.from_feature_names(cfg.feature_names), flow_config=cfg)
        v.set_base_model(model.get_base_model(), base_id=base)
        model = FlowCheckedModelForCausalLM(model.get_base_model(), v.eval(), tokenizer=model.tokenizer)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--validator", default=None)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--check-every", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(2)

    model = load(args.model, args.validator)
    tok = model.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(QUESTIONS, return_tensors="pt", padding=True)
    out = model.generate(
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        return_flow_scores=True,
        flow_check_every=args.check_every,
        flow_abstain_threshold=args.threshold,
        flow_abstain_message="I am not sure.",
    )
    steps = out.flow_check_steps.tolist()
    for row, q in enumerate(QUESTIONS):
        answer = tok.decode(out.sequences[row, out.prompt_length :], skip_special_tokens=True).strip()
        running = ", ".join(f"{s}:{v:.2f}" for s, v in zip(steps, out.flow_running_scores[:, row].tolist()) if v == v)
        print(q.splitlines()[0])
        print(f"  answer:    {answer!r}")
        print(f"  running:   {running}   (generated tokens:score)")
        print(f"  final:     {float(out.flow_scores[row]):.3f}   abstained: {bool(out.flow_abstained[row])}")


if __name__ == "__main__":
    main()
