"""The common interface of every hallucination detector.

Every detector scores **higher = more likely hallucinated** and works in two steps, so that
``flowcheck compare`` can run them all on the same model, data and split and time each one:

1. :meth:`Detector.featurize` turns a list of :class:`ScoredExample` (token ids of a prompt and
   of an answer, plus the texts) into the detector's per-sample representation by running the
   base model (a forward pass, a forward-backward pass, sampling ...). This is the step whose
   cost is compared with plain generation.
2. :meth:`Detector.fit` (trainable detectors only; train and validation representations) and
   :meth:`Detector.score` (representation ``->`` ``float64[N]`` scores) need no model.

Detectors that share a representation (the four token-confidence statistics) declare the same
:attr:`Detector.feature_key`; a caller may compute it once and pass it to each of them.

Example:
    >>> import numpy as np
    >>> class Length(Detector):
    ...     name = "length"
    ...     def featurize(self, model, examples, *, tokenizer=None):
    ...         return np.array([len(e.answer_ids) for e in examples], dtype=float)
    ...     def score(self, features):
    ...         return np.asarray(features, dtype=np.float64)
    >>> ex = [ScoredExample([1, 2], [3]), ScoredExample([1], [3, 4, 5])]
    >>> Length().score(Length().featurize(None, ex)).tolist()
    [1.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hf_flowcheck.errors import NotFittedError

__all__ = [
    "SCORE_DIRECTION",
    "Detector",
    "NotFittedError",
    "ScoredExample",
    "batch_examples",
    "encode_text",
    "scored_examples",
    "tokenize_prompt_answer",
]

SCORE_DIRECTION = "higher = more likely hallucinated"


@dataclass
class ScoredExample:
    """One (prompt, answer) pair as token ids, the unit every detector scores.

    Attributes:
        prompt_ids: Token ids of the prompt (special tokens included as the tokenizer adds them).
        answer_ids: Token ids of the answer that follows the prompt (teacher-forced).
        label: 0 correct, 1 hallucinated (2 = did not answer, for 3-class detectors), or ``None``.
        uid: Source-record uid (splits are grouped by it).
        prompt: Prompt text (sampling detectors decode and compare texts).
        answer: Answer text (the model's own greedy answer in the generated protocol).
        source: ``"right"``/``"hallucinated"`` (paired), ``"generated"`` or ``"natural"``.
        meta: Free per-example facts (not used by the detectors).
    """

    prompt_ids: list[int]
    answer_ids: list[int]
    label: int | None = None
    uid: str = ""
    prompt: str = ""
    answer: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_ids = [int(i) for i in _as_list(self.prompt_ids)]
        self.answer_ids = [int(i) for i in _as_list(self.answer_ids)]
        if not self.prompt_ids:
            raise ValueError(
                f"ScoredExample {self.uid or '(no uid)'} has an empty prompt; every detector conditions on a prompt "
                "of at least one token (add the tokenizer's BOS token)."
            )

    @property
    def input_ids(self) -> list[int]:
        """``prompt_ids + answer_ids``."""
        return self.prompt_ids + self.answer_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def _as_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    return list(ids)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text)`` token ids (special tokens added) as a flat list."""
    enc = tokenizer(text, add_special_tokens=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def tokenize_prompt_answer(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """The one rule for where a prompt ends and its answer begins: ``(ids, start)``.

    The prompt and ``prompt + completion`` are tokenized separately; the answer is what follows their
    common prefix (so a token merged across the boundary belongs to the answer), and at least one
    prompt token is kept (the first answer token needs a context to be predicted from).
    Extraction into stores and every detector's featurization use this function.

    Returns:
        ``ids`` of ``prompt + completion`` and ``start``, the index of the first answer token.
    """
    p_ids = encode_text(tokenizer, prompt)
    f_ids = encode_text(tokenizer, prompt + completion)
    common = 0
    for a, b in zip(p_ids, f_ids):
        if a != b:
            break
        common += 1
    return f_ids, min(max(common, 1), len(f_ids))


def scored_examples(tokenizer: Any, examples: Sequence[Any]) -> list[ScoredExample]:
    """Tokenize labelled examples (``.prompt``, ``.completion``/``.answer``, ``.label``, ``.uid``).

    The boundary is :func:`tokenize_prompt_answer`'s, the same rule extraction into stores uses.

    Args:
        tokenizer: A HuggingFace tokenizer.
        examples: :class:`~hf_flowcheck.data.LabeledExample` items (or objects with the same fields).

    Returns:
        One :class:`ScoredExample` per input, same order.
    """
    out = []
    for ex in examples:
        completion = getattr(ex, "completion", None) or (" " + ex.answer)
        f_ids, common = tokenize_prompt_answer(tokenizer, ex.prompt, completion)
        out.append(
            ScoredExample(
                f_ids[:common],
                f_ids[common:],
                getattr(ex, "label", None),
                getattr(ex, "uid", ""),
                ex.prompt,
                ex.answer,
                getattr(ex, "source", ""),
            )
        )
    return out


def batch_examples(
    examples: Sequence[ScoredExample], pad_id: int = 0, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``prompt + answer`` of several examples into one batch.

    Args:
        examples: The examples.
        pad_id: Token used for padding (masked out).
        left: Pad on the left (for generation) instead of the right.

    Returns:
        ``(input_ids [N, S], attention_mask [N, S], answer_mask [N, S])``, all long; ``answer_mask``
        is 1 on the answer tokens.
    """
    width = max(e.length for e in examples)
    n = len(examples)
    ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    ans = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        off = width - e.length if left else 0
        ids[i, off : off + e.length] = torch.tensor(e.input_ids, dtype=torch.long)
        att[i, off : off + e.length] = 1
        ans[i, off + len(e.prompt_ids) : off + e.length] = 1
    return ids, att, ans


class Detector:
    """Base class of hallucination detectors (see the module docstring for the two steps).

    Subclasses set :attr:`name`, implement :meth:`featurize` and :meth:`score`, and (when
    :attr:`trainable`) :meth:`fit` plus :attr:`is_fitted`.

    Attributes:
        name: Short display name (row name in comparison tables).
        score_direction: Always ``"higher = more likely hallucinated"``.
        score_range: Human-readable range of the scores (e.g. ``"[0, 1]"``).
        trainable: Whether :meth:`fit` must run before :meth:`score`.
        protocols: Labelling protocols the detector is meaningful for (``None`` = all).
    """

    name: str = "detector"
    score_direction: ClassVar[str] = SCORE_DIRECTION
    score_range: str = "(-inf, inf)"
    trainable: bool = False
    protocols: tuple[str, ...] | None = None

    @property
    def feature_key(self) -> str:
        """Detectors with equal keys share :meth:`featurize` output (computed once by callers)."""
        return f"{type(self).__name__}:{id(self)}"

    @property
    def is_fitted(self) -> bool:
        """``True`` when :meth:`score` may be called (always for training-free detectors)."""
        return not self.trainable

    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> Any:
        """Run the base model and return the per-sample representation this detector scores.

        Args:
            model: The base causal LM.
            examples: ``N`` examples.
            tokenizer: Needed by detectors that decode text (sampling agreement).

        Returns:
            A representation with ``N`` rows (type depends on the detector).
        """
        raise NotImplementedError(f"{type(self).__name__}.featurize() is not implemented.")

    def fit(
        self, features: Any, labels: Any, val_features: Any = None, val_labels: Any = None
    ) -> Detector:  # pragma: no cover - trivial
        """Train on train representations; the validation split selects models/checkpoints.

        Training-free detectors accept and ignore the call. Returns ``self``.
        """
        return self

    def score(self, features: Any) -> np.ndarray:
        """Scores ``float64[N]``, higher = more likely hallucinated.

        Raises:
            NotFittedError: A trainable detector has not been fitted (or loaded).
        """
        raise NotImplementedError(f"{type(self).__name__}.score() is not implemented.")

    # ----------------------------------------------------------------------- conveniences
    def fit_examples(
        self,
        model: nn.Module,
        train: Sequence[ScoredExample],
        validation: Sequence[ScoredExample] | None = None,
        *,
        tokenizer: Any = None,
    ) -> Detector:
        """:meth:`featurize` the splits and :meth:`fit` on their labels."""
        tr = self.featurize(model, train, tokenizer=tokenizer)
        va = self.featurize(model, validation, tokenizer=tokenizer) if validation else None
        return self.fit(tr, _labels(train), va, _labels(validation) if validation else None)

    def score_examples(
        self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None
    ) -> np.ndarray:
        """:meth:`featurize` then :meth:`score`."""
        self.require_fitted()
        return self.score(self.featurize(model, examples, tokenizer=tokenizer))

    def require_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless the detector can score."""
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} ({self.name!r}) has not been fitted: call .fit(train_features, "
                "train_labels, val_features, val_labels) (or .fit_examples(model, train, validation)) first, or "
                "load a trained one with from_pretrained()."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, fitted={self.is_fitted})"


def _labels(examples: Sequence[ScoredExample]) -> np.ndarray:
    missing = [i for i, e in enumerate(examples) if e.label is None]
    if missing:
        raise ValueError(
            f"{len(missing)} example(s) have label=None (first at {missing[:5]}); training needs labelled examples "
            "(drop the judge-dropped ones)."
        )
    return np.asarray([int(e.label) for e in examples], dtype=np.int64)  # type: ignore[arg-type]
