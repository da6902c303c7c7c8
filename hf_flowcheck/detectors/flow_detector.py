"""A trained flow validator behind the :class:`~hf_flowcheck.detectors.base.Detector` interface (for comparisons)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from hf_flowcheck.detectors.base import Detector, ScoredExample, batch_examples
from hf_flowcheck.model_io import pad_token_id

__all__ = ["FlowValidatorDetector"]


class FlowValidatorDetector(Detector):
    """A trained :class:`~hf_flowcheck.detectors.FlowValidator` behind the :class:`Detector` interface.

    :meth:`featurize` extracts teacher-forced flow signatures of the answers with the validator's
    own ``FlowConfig``; :meth:`score` is the validator's ``sigmoid(logit)`` in ``[0, 1]``. Samples
    without any valid event (e.g. an answer made only of special tokens) get ``nan_score``.

    Args:
        validator: The trained validator.
        tokenizer: Its special tokens are excluded from the token mask.
        batch_size: Sequences per extraction pass.
        nan_score: Score of samples without events (0.5: uninformative).
    """

    name = "flow validator"
    score_range = "[0, 1]"

    def __init__(self, validator: Any, *, tokenizer: Any = None, batch_size: int = 8, nan_score: float = 0.5) -> None:
        self.validator = validator
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.nan_score = float(nan_score)
        self.last_without_events = 0

    @property
    def is_fitted(self) -> bool:
        return True  # trained elsewhere (flowcheck train)

    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> Any:
        from hf_flowcheck.extraction import FlowExtractor
        from hf_flowcheck.features import pad_features

        if self.validator.base_fingerprint is not None:
            self.validator.check_compatible(model)
        cfg = self.validator.flow_config
        if cfg is None:
            raise ValueError(
                "The flow validator carries no flow_config, so its features cannot be extracted; use a validator "
                "trained with `flowcheck train` (it records the FlowConfig)."
            )
        ext = FlowExtractor(model, cfg, tokenizer=tokenizer or self.tokenizer)
        pad = pad_token_id(model, default=0)
        parts = []
        for start in range(0, len(examples), self.batch_size):
            ids, att, ans = batch_examples(list(examples[start : start + self.batch_size]), pad)
            parts.append(ext.extract(ids, att, ans).to("cpu"))
        return pad_features(parts)

    def score(self, features: Any) -> np.ndarray:
        out = self.validator.score_features(features)
        s = out.scores.detach().cpu().numpy().astype(np.float64)
        nan = np.isnan(s)
        self.last_without_events = int(nan.sum())
        s[nan] = self.nan_score
        return s
