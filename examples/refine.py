"""Refine a flagged answer: roll back to the culprit token and regenerate with the culprit block clamped.

    python examples/refine.py [--validator FOLDER_OR_HUB_ID] [--strategy flow|random_depth|regenerate]
                              [--report refine_report.html]

Refines the answer whatever its score (``rows=[0]``) so the mechanics are visible; in practice
``model.refine(out)`` refines rows whose score is above ``threshold=0.5``. Without a trained
validator this uses a RANDOMLY INITIALISED one (it says so).
"""

from __future__ import annotations

import argparse

import torch

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowValidator, ValidatorConfig

PROMPT = "Question: Which river flows through Vienna?\nAnswer:"


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
    p.add_argument("--strategy", default="flow", choices=["flow", "random_depth", "regenerate"])
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--report", default=None, help="Also write an HTML report with the before/after here.")
    args = p.parse_args()
    torch.set_num_threads(2)

    model = load(args.model, args.validator)
    tok = model.tokenizer
    enc = tok(PROMPT, return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
        return_flow_scores=True,
    )
    res = model.refine(out, rows=[0], strategy=args.strategy, seed=0)
    for row in res.rows:
        print(f"strategy {row.strategy}, culprit (position, block) {row.culprit_before}, block {row.patched_block}")
        print(f"before ({row.score_before:.3f}): {tok.decode(row.original_answer_ids, skip_special_tokens=True)!r}")
        print(f"after  ({row.score_after:.3f}): {tok.decode(row.refined_answer_ids, skip_special_tokens=True)!r}")
        print(
            f"clamp: lambda < 1 at {row.positions_clamped}/{row.positions_patched} positions, "
            f"mean lambda {row.mean_lambda:.3f}; cost ratio {row.cost_ratio:.2f}"
        )
    for row, reason in res.skipped.items():
        print(f"row {row} not refined: {reason}")
    if args.report:
        from hf_flowcheck.report import render_report, report_items_from_output

        render_report(report_items_from_output(out, tok, prompts=[PROMPT], refinements=res), args.report)
        print(f"Wrote {args.report}")


if __name__ == "__main__":
    main()
