"""Judges that label a generated answer as correct (0) or hallucinated (1).

All judges share one small interface::

    judge(question, answer, reference, knowledge=None) -> JudgeResult(label, reason, status)

``label`` is 0 (correct), 1 (hallucinated) or ``None``. ``None`` comes with ``status``
``"dropped"`` (the judge deliberately abstains, e.g. the F1 grey zone) or ``"failed"`` (the judge
could not answer, e.g. an endpoint kept timing out). A ``None`` is never turned into a label.

* :class:`ReferenceF1Judge` -- offline, SQuAD-style token F1 against the right answer.
* :class:`CausalLMJudge` -- any HF causal LM asked a fixed yes/no template.
* :class:`OpenAIChatJudge` -- any OpenAI-compatible ``/v1/chat/completions`` endpoint.
* :class:`CallableJudge` / :func:`as_judge` -- wrap a plain function.

Example:
    >>> from hf_flowcheck.data.judges import ReferenceF1Judge
    >>> ReferenceF1Judge()("Who?", "Arthur's Magazine", "Arthur's Magazine").label
    0
"""

from __future__ import annotations

import http.client
import json
import re
import string
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "CallableJudge",
    "CausalLMJudge",
    "Judge",
    "JudgeResult",
    "OpenAIChatJudge",
    "ReferenceF1Judge",
    "as_judge",
    "normalize_answer",
    "parse_yes_no",
    "token_f1",
]

JudgeStatus = Literal["labelled", "dropped", "failed"]


@dataclass(frozen=True)
class JudgeResult:
    """The verdict of a judge on one answer.

    Attributes:
        label: 0 = correct, 1 = hallucinated, ``None`` = no label (see ``status``).
        reason: Human-readable justification (score, raw reply, error).
        status: ``"labelled"`` when ``label`` is set; ``"dropped"`` when the judge abstains by
            design; ``"failed"`` when the judge could not produce a verdict.
    """

    label: int | None
    reason: str = ""
    status: JudgeStatus = "labelled"

    def __post_init__(self) -> None:
        if self.label not in (0, 1, None):
            raise ValueError(f"JudgeResult.label={self.label!r}; must be 0 (correct), 1 (hallucinated) or None.")
        if self.status not in ("labelled", "dropped", "failed"):
            raise ValueError(f"JudgeResult.status={self.status!r}; must be 'labelled', 'dropped' or 'failed'.")
        if (self.label is None) == (self.status == "labelled"):
            raise ValueError(
                f"JudgeResult(label={self.label!r}, status={self.status!r}) is inconsistent: a label needs "
                "status='labelled' and label=None needs status 'dropped' or 'failed'."
            )


@runtime_checkable
class Judge(Protocol):
    """Protocol every judge implements."""

    def __call__(
        self, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None = None
    ) -> JudgeResult:
        """Label ``answer`` to ``question`` given the ``reference`` answer(s)."""
        ...


# ---------------------------------------------------------------------------------------------
# Token F1 (SQuAD v1.1 evaluation script semantics)
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(a: str, b: str) -> float:
    """SQuAD-style token F1 between two strings after :func:`normalize_answer`.

    Symmetric. If either side normalises to no tokens, returns 1.0 when both are empty, else 0.0.

    Args:
        a: Prediction.
        b: Reference.

    Returns:
        F1 in ``[0, 1]``.

    Example:
        >>> round(token_f1("the Eiffel Tower in Paris", "Eiffel Tower"), 3)
        0.667
    """
    ta, tb = normalize_answer(a).split(), normalize_answer(b).split()
    if not ta or not tb:
        return float(ta == tb)
    common = Counter(ta) & Counter(tb)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(ta), same / len(tb)
    return 2 * precision * recall / (precision + recall)


def _references(reference: str | Sequence[str] | None) -> list[str]:
    if reference is None:
        return []
    if isinstance(reference, str):
        return [reference]
    return [str(r) for r in reference]


class ReferenceF1Judge:
    """Offline judge: token F1 of the answer against the right answer(s) (best over references).

    ``F1 >= correct_threshold`` -> 0 (correct); ``F1 == 0`` -> 1 (hallucinated); anything in
    between is *dropped* (``label=None``). Never labels by substring containment.

    Args:
        correct_threshold: F1 at or above which the answer counts as correct (default 0.5).
    """

    def __init__(self, correct_threshold: float = 0.5):
        if not 0.0 < correct_threshold <= 1.0:
            raise ValueError(f"correct_threshold={correct_threshold!r} must be in (0, 1].")
        self.correct_threshold = correct_threshold

    def __call__(
        self, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None = None
    ) -> JudgeResult:
        refs = _references(reference)
        if not refs:
            raise ValueError(
                "ReferenceF1Judge needs a reference answer, got none; use records with a right answer "
                "or another judge (CausalLMJudge, OpenAIChatJudge)."
            )
        f1 = max(token_f1(answer, r) for r in refs)
        if f1 >= self.correct_threshold:
            return JudgeResult(0, f"token F1 {f1:.3f} >= {self.correct_threshold}")
        if f1 == 0.0:
            return JudgeResult(1, "token F1 0.000")
        return JudgeResult(None, f"token F1 {f1:.3f} in (0, {self.correct_threshold}): dropped", "dropped")

    def __repr__(self) -> str:
        return f"ReferenceF1Judge(correct_threshold={self.correct_threshold})"


# ---------------------------------------------------------------------------------------------
# Yes/no templates shared by the model judges
# ---------------------------------------------------------------------------------------------

JUDGE_TEMPLATE = (
    "{knowledge_block}Question: {question}\n"
    "Reference answer: {reference}\n"
    "Proposed answer: {answer}\n"
    "Does the proposed answer give the same answer as the reference answer? Answer Yes or No.\n"
    "Answer:"
)
"""Fixed yes/no template; ``Yes`` means correct (label 0), ``No`` means hallucinated (label 1)."""


def _format_judge_prompt(
    template: str, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None
) -> str:
    refs = _references(reference)
    return template.format(
        knowledge_block=f"Knowledge: {knowledge}\n" if knowledge else "",
        question=question,
        answer=answer,
        reference=" / ".join(refs) if refs else "(none given)",
    )


def parse_yes_no(text: str) -> int | None:
    """Map a judge reply to a label: starts with "yes" -> 0, "no" -> 1, anything else -> None."""
    words = re.findall(r"[a-z]+", text.strip().lower())
    if not words:
        return None
    return {"yes": 0, "no": 1}.get(words[0])


class CausalLMJudge:
    """Judge with any Hugging Face causal LM: compare next-token logits of " Yes" and " No".

    The model reads :data:`JUDGE_TEMPLATE` (optionally through the tokenizer's chat template)
    and the label is 0 when ``logit(" Yes") > logit(" No")``, else 1. With ``margin > 0`` a
    difference smaller than ``margin`` gives a dropped item.

    Args:
        model: A ``PreTrainedModel`` for causal LM.
        tokenizer: Its tokenizer.
        template: Prompt template with ``{knowledge_block}``, ``{question}``, ``{reference}``,
            ``{answer}`` placeholders.
        use_chat_template: Wrap the prompt in the tokenizer's chat template. ``None`` = only when
            the tokenizer has one.
        yes_token: Text whose first token means yes (default ``" Yes"``).
        no_token: Text whose first token means no (default ``" No"``).
        margin: Minimum ``|logit(yes) - logit(no)|`` to give a label.
        max_length: Truncate the prompt from the left to this many tokens.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        template: str = JUDGE_TEMPLATE,
        use_chat_template: bool | None = None,
        yes_token: str = " Yes",
        no_token: str = " No",
        margin: float = 0.0,
        max_length: int | None = 2048,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_chat:
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat_template; pass use_chat_template=False."
            )
        self.use_chat_template = has_chat if use_chat_template is None else use_chat_template
        self.margin = float(margin)
        self.max_length = max_length
        self.yes_id = self._first_token(yes_token)
        self.no_id = self._first_token(no_token)
        if self.yes_id == self.no_id:
            raise ValueError(
                f"yes_token={yes_token!r} and no_token={no_token!r} start with the same token id {self.yes_id}; "
                "pick texts that tokenize differently."
            )

    def _first_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{text!r} encodes to no tokens with this tokenizer; pass yes_token=/no_token=.")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and ids[0] == unk:
            raise ValueError(f"{text!r} is an unknown token for this tokenizer; pass yes_token=/no_token=.")
        return int(ids[0])

    def _prompt(self, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None) -> str:
        text = _format_judge_prompt(self.template, question, answer, reference, knowledge)
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def __call__(
        self, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None = None
    ) -> JudgeResult:
        import torch

        prompt = self._prompt(question, answer, reference, knowledge)
        ids = self.tokenizer(prompt, add_special_tokens=not self.use_chat_template, return_tensors="pt")["input_ids"]
        if self.max_length is not None and ids.shape[1] > self.max_length:
            ids = ids[:, -self.max_length :]
        try:
            device = next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            device = torch.device("cpu")
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(device)).logits[0, -1].float()
        yes, no = float(logits[self.yes_id]), float(logits[self.no_id])
        diff = yes - no
        reason = f"logit(yes) - logit(no) = {diff:.4f}"
        if diff != diff:  # NaN
            return JudgeResult(None, reason + " (NaN logits)", "failed")
        if abs(diff) < self.margin:
            return JudgeResult(None, reason + f" below margin {self.margin}", "dropped")
        return JudgeResult(0 if diff > 0 else 1, reason)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ---------------------------------------------------------------------------------------------


class OpenAIChatJudge:
    """Judge through any OpenAI-compatible ``/v1/chat/completions`` endpoint (stdlib ``urllib``).

    The reply must start with "Yes" (label 0) or "No" (label 1). Timeouts, connection errors,
    HTTP 429/5xx, malformed JSON and nonsense replies are retried ``max_retries`` times with
    exponential backoff; after that the item gets ``label=None, status="failed"`` and is counted
    in ``stats["failed"]`` -- it is never silently labelled. HTTP 401/403/404 raise at once (a
    configuration error that retrying cannot fix).

    Args:
        url: Server base (``http://host:port``), ``.../v1``, or the full ``.../chat/completions``.
        model: Model name sent in the request.
        api_key: Optional bearer token.
        timeout: Seconds per request.
        max_retries: Retries after the first attempt.
        backoff: First backoff in seconds; doubles each retry.
        template: Prompt template (see :data:`JUDGE_TEMPLATE`).
        system_prompt: Optional system message.
        max_tokens: Reply length cap.
        sleep: Sleep function (injectable for tests).

    Attributes:
        stats: Counters ``calls``, ``requests``, ``retries``, ``failed``, ``labelled``.
    """

    def __init__(
        self,
        url: str,
        model: str = "gpt-4o-mini",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        template: str = JUDGE_TEMPLATE,
        system_prompt: str | None = "You grade answers. Reply with exactly one word: Yes or No.",
        max_tokens: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} must be >= 0.")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds.")
        self.endpoint = self._endpoint(url)
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.template = template
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self._sleep = sleep
        self.stats: dict[str, int] = {"calls": 0, "requests": 0, "retries": 0, "failed": 0, "labelled": 0}

    @staticmethod
    def _endpoint(url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r} must start with http:// or https://.")
        url = url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        if url.endswith("/v1"):
            return url + "/chat/completions"
        return url + "/v1/chat/completions"

    def _request(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        return str(payload["choices"][0]["message"]["content"] or "")

    def __call__(
        self, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None = None
    ) -> JudgeResult:
        self.stats["calls"] += 1
        prompt = _format_judge_prompt(self.template, question, answer, reference, knowledge)
        problems: list[str] = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                self._sleep(self.backoff * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                reply = self._request(prompt)
            except urllib.error.HTTPError as err:
                if err.code in (401, 403, 404):
                    raise RuntimeError(
                        f"{self.endpoint} answered HTTP {err.code} ({err.reason}); check the URL, the model "
                        "name and api_key."
                    ) from err
                problems.append(f"HTTP {err.code}")
                continue
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
                problems.append(f"{type(err).__name__}: {getattr(err, 'reason', err)}")
                continue
            except (ValueError, KeyError, IndexError, TypeError) as err:
                problems.append(f"malformed response ({type(err).__name__})")
                continue
            label = parse_yes_no(reply)
            if label is None:
                problems.append(f"nonsense reply {reply[:40]!r}")
                continue
            self.stats["labelled"] += 1
            return JudgeResult(label, f"reply {reply.strip()[:40]!r}")
        self.stats["failed"] += 1
        return JudgeResult(
            None, f"no usable reply after {self.max_retries + 1} attempts: " + "; ".join(problems), "failed"
        )

    def __repr__(self) -> str:
        return f"OpenAIChatJudge(url={self.endpoint!r}, model={self.model!r})"


# ---------------------------------------------------------------------------------------------
# Plain callables
# ---------------------------------------------------------------------------------------------


@dataclass
class CallableJudge:
    """Wrap a function ``fn(question, answer, reference, knowledge) -> JudgeResult | int | bool | None``.

    ``True``/``1`` mean hallucinated, ``False``/``0`` correct, ``None`` dropped. Exceptions raised
    by ``fn`` propagate.
    """

    fn: Callable[..., Any]
    name: str = field(default="callable")

    def __call__(
        self, question: str, answer: str, reference: str | Sequence[str] | None, knowledge: str | None = None
    ) -> JudgeResult:
        out = self.fn(question, answer, reference, knowledge)
        if isinstance(out, JudgeResult):
            return out
        if out is None:
            return JudgeResult(None, f"{self.name} returned None", "dropped")
        if isinstance(out, bool) or out in (0, 1):
            return JudgeResult(int(out), f"{self.name} returned {out!r}")
        raise ValueError(
            f"judge {self.name!r} returned {out!r}; return 0 (correct), 1 (hallucinated), None or a JudgeResult."
        )


def as_judge(obj: Any) -> Judge:
    """Return ``obj`` if it already returns :class:`JudgeResult`, else wrap it in :class:`CallableJudge`."""
    if isinstance(obj, (ReferenceF1Judge, CausalLMJudge, OpenAIChatJudge, CallableJudge)):
        return obj
    if not callable(obj):
        raise TypeError(f"judge must be callable, got {type(obj).__name__}.")
    return CallableJudge(obj, getattr(obj, "__name__", type(obj).__name__))


#: ``judge=RECORD_LABEL``: label an answer with its record's own label (datasets that pair answers with labels).
RECORD_LABEL = "record-label"


def judge_record(judge: Any, record: Any, answer: str) -> JudgeResult:
    """Judge ``answer`` to ``record`` with ``judge``: the one place every workflow calls a judge.

    Args:
        judge: :data:`RECORD_LABEL`; a judge that takes the whole record (``takes_example = True``,
            e.g. the corpus judge); or a ``Judge`` called as ``judge(question, answer, reference, knowledge)``
            (the reference is the record's one reference, or its list when it has several).
        record: The :class:`~hf_flowcheck.data.Example` answered.
        answer: The model's (post-processed) answer.

    Raises:
        TypeError: The judge returned something else than a :class:`JudgeResult`.
    """
    if judge == RECORD_LABEL:
        if record.label is None:
            return JudgeResult(None, "record has no label", "failed")
        return JudgeResult(int(record.label), "record label")
    if getattr(judge, "takes_example", False):
        result = judge(record, answer)
    else:
        refs = record.references
        ref: Any = (refs if len(refs) != 1 else refs[0]) if refs else None
        result = judge(record.question, answer, ref, record.knowledge)
    if not isinstance(result, JudgeResult):
        raise TypeError(f"judge returned {type(result).__name__}; it must return a JudgeResult.")
    return result
