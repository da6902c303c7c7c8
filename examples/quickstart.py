"""Flow-checked generation on the bundled offline model (SmolLM2-135M-Instruct).

    python examples/quickstart.py [--validator FOLDER_OR_HUB_ID] [--max-new-tokens 64]

Asks a question the way people ask an Instruct model -- through its chat template -- and prints the
answer, its flow score (higher = more likely hallucinated), the culprit token and block, and the
shape of the flow signatures. Uses the validator bundled for the model when there is one;
without one (and without --validator) it falls back to a RANDOMLY INITIALISED validator and says
so: the numbers then only show the API, not a detection.
"""

from __future__ import annotations

import argparse

import torch

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowValidator, ValidatorConfig

QUESTION = "Which engineer is the Eiffel Tower named after?"


def load(base: str, validator: str | None) -> FlowCheckedModelForCausalLM:
    kwargs = {} if validator is None else {"validator": validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(base, **kwargs)
    if model.validator is None:
        print("NOTE: no trained validator for this model (none bundled, none given): using a RANDOMLY")
        print("      INITIALISED validator; the scores below are meaningless. Train one with")
        print("      examples/train_your_own_validator.sh and pass --validator.\n")
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
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2)

    model = load(args.model, args.validator)
    tok = model.tokenizer
    messages = [{"role": "user", "content": QUESTION}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(  # the reply ends at the model's own end of turn
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
        return_flow_scores=True,
        return_flow_features=True,
    )

    p_len = out.prompt_length
    print(f"Question: {QUESTION}")
    print(f"Answer:   {tok.decode(out.sequences[0, p_len:], skip_special_tokens=True).strip()!r}")
    print(f"Flow score: {float(out.flow_scores[0]):.3f} (higher = more likely hallucinated)")
    pos, block = (int(x) for x in out.flow_culprits[0])
    print(f"Culprit: token {tok.decode(out.sequences[0, pos])!r} (answer token {pos - p_len}), block {block}")
    feats = out.flow_features
    n, b, t, f = feats.values.shape
    print(f"Flow signatures: {n} answer x {b} blocks x {t} tokens x {f} features ({', '.join(feats.names)})")


if __name__ == "__main__":
    main()
