"""Watch the risk of every token while the model writes (terminal colours), or serve it as events.

    python examples/stream_risk.py                      # the bundled SmolLM2 and its streaming validator
    python examples/stream_risk.py --serve              # print the server-sent events a web handler would send

Each piece of text is printed as soon as the streaming check has scored it, coloured by the
validator's per-token risk (green < 0.3 <= yellow < 0.6 <= red), followed by the running flow score
of the whole answer. For SmolLM2 the default is the bundled *streaming* validator (flow + lens, trained
on answer prefixes too, no state branch), whose running scores mean something before the answer ends;
checks refit the window bases when the answer has doubled (``--refit always`` for the spec's score at
every check). ``--serve`` shows the served use: :func:`sse_events` is an iterator a web
handler (Starlette's ``StreamingResponse``, Flask's ``Response``) can return as it is; ``generate``
runs in a worker thread and a client that goes away cancels it.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from typing import Any

from transformers import StoppingCriteriaList

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowStreamChunk, FlowTextStreamer
from hf_flowcheck.cli.generation import DEMO_SAMPLES
from hf_flowcheck.data import Example, generation_prompt
from hf_flowcheck.stopping import AnswerLineStop

#: Flow + lens, trained with prefix_augment=0.5 and no state branch (see the streaming guide).
STREAMING_VALIDATOR = "bundled:smollm2-135m-instruct-halueval-qa-streaming"


def qa_prompt(question: str, knowledge: str | None) -> str:
    """The 2-shot prompt the bundled validator's training answers were written under."""
    fields = {"knowledge": knowledge or "", "question": question}
    return generation_prompt(Example(uid="example", task="qa", prompt_fields=fields))


def colour(chunk: FlowStreamChunk) -> str:
    """The chunk's text in an ANSI colour by its highest token risk (grey: not scored).

    With the default check every token, a chunk is one token.
    """
    risk = max((r for r in chunk.token_risks if r == r), default=float("nan"))
    if risk != risk:
        code = "90"
    elif risk < 0.3:
        code = "32"
    elif risk < 0.6:
        code = "33"
    else:
        code = "31"
    return f"\033[{code}m{chunk.text}\033[0m"


def stream_answer(model: Any, tokenizer: Any, prompt: Any, **generate_kwargs: Any) -> Iterator[FlowStreamChunk]:
    """Yield the answer's chunks while ``generate`` runs in a worker thread.

    Args:
        model: A :class:`~hf_flowcheck.FlowCheckedModelForCausalLM` with a validator.
        tokenizer: Its tokenizer (decodes the pieces).
        prompt: A string, or ``input_ids`` ``[1, P]``.
        **generate_kwargs: Decoding settings (``max_new_tokens``, ``flow_check_every``...).

    The consumer may stop early: closing the iterator cancels the generation.
    """
    if isinstance(prompt, str):
        prompt = tokenizer(prompt, return_tensors="pt").input_ids
    streamer = FlowTextStreamer(tokenizer, timeout=600)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            model.generate(input_ids=prompt, streamer=streamer, **generate_kwargs)
        except BaseException as err:  # reported to the consumer by the streamer
            failure.append(err)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        streamer.cancel()  # the consumer stopped early (or finished): let generate end
        worker.join()


def sse_events(model: Any, tokenizer: Any, prompt: str, **generate_kwargs: Any) -> Iterator[str]:
    """Server-sent events for a web handler: one ``data:`` line per chunk, JSON."""
    for chunk in stream_answer(model, tokenizer, prompt, **generate_kwargs):
        payload = {
            "text": chunk.text,
            "score": None if chunk.score != chunk.score else round(chunk.score, 4),
            "token_risks": [None if r != r else round(r, 4) for r in chunk.token_risks],
            "final": chunk.final,
        }
        yield f"data: {json.dumps(payload)}\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument(
        "--validator",
        default=None,
        help=f"Default: {STREAMING_VALIDATOR} for SmolLM2, else the bundled validator for the model.",
    )
    p.add_argument("--refit", choices=["always", "doubling"], default="doubling", help="flow_check_refit")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--serve", action="store_true", help="Print server-sent events instead of colours.")
    args = p.parse_args()
    validator = args.validator
    if validator is None and args.model == "SmolLM2-135M-Instruct":
        validator = STREAMING_VALIDATOR
    kwargs = {} if validator is None else {"validator": validator}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, **kwargs)
    tok = model.tokenizer
    gen = dict(
        max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, flow_check_refit=args.refit
    )
    for question, knowledge, reference, style in DEMO_SAMPLES:
        if style != "plain-fewshot":  # the streaming validator was trained on the HaluEval-QA two-shot format
            continue
        q = qa_prompt(question, knowledge)
        print(f"Q: {question.strip()}  (reference: {reference})")
        # The answer ends with its line, newline included, as in the validator's training answers.
        width = len(tok(q).input_ids)
        gen["stopping_criteria"] = StoppingCriteriaList([AnswerLineStop(tok, width)])
        if args.serve:
            for event in sse_events(model, tok, q, **gen):
                print(event, end="")
            continue
        last = None
        for chunk in stream_answer(model, tok, q, **gen):
            print(colour(chunk), end="", flush=True)
            last = chunk
        print(f"   [flow score {last.score:.2f}]\n" if last is not None else "")


if __name__ == "__main__":
    main()
