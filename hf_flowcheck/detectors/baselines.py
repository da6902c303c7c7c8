"""Baseline detectors to compare gradient and flow signatures against (``evaluation.md``).

Every score here is **higher = more likely hallucinated**:

| detector | score | range | trains? | cost |
|---|---|---|---|---|
| :class:`TokenConfidenceDetector` | ``mean_logprob``: ``-mean log p(answer token)`` | ``[0, inf)`` | no | a forward |
| (same forward) | ``min_logprob``: ``-min log p(answer token)`` | ``[0, inf)`` | no | shared |
| (same forward) | ``mean_entropy``: mean next-token entropy at the answer tokens | ``[0, log V]`` | no | shared |
| (same forward) | ``perplexity``: ``exp(-mean log p)`` | ``[1, inf)`` | no | shared |
| :class:`SamplingAgreementDetector` | ``1 - mean token F1(sample_i, answer)`` | ``[0, 1]`` | no | n generations |
| :class:`HiddenStateProbe` | ``P(hallucinated)``, one layer at the last answer token | ``[0, 1]`` | yes | a forward |
| :class:`AnswerLengthDetector` | answer tokens (paired protocol only: leakage control) | ``[0, inf)`` | no | free |

The four confidence statistics come from one teacher-forced forward over prompt + answer; they
share :attr:`~hf_flowcheck.detectors.base.Detector.feature_key`, so a caller computes that
forward once (:func:`token_confidence_features`).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=4, intermediate_size=37)).eval()
    >>> ex = [ScoredExample([1, 5, 6], [7, 8]), ScoredExample([1, 9], [10, 11, 12])]
    >>> det = TokenConfidenceDetector("perplexity")
    >>> det.score(det.featurize(lm, ex)).shape
    (2,)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from hf_flowcheck.data import clean_generation, token_f1
from hf_flowcheck.detectors.base import Detector, ScoredExample, batch_examples
from hf_flowcheck.detectors.checkpoint import SavedDetectorMixin, card_front_matter, fingerprint_table, jsonable
from hf_flowcheck.metrics import auroc
from hf_flowcheck.model_io import forward_kwargs, input_device, pad_token_id
from hf_flowcheck.stopping import AnswerLineStop, supports_answer_line_stop
from hf_flowcheck.version import __version__

__all__ = [
    "CONFIDENCE_STATISTICS",
    "AnswerLengthDetector",
    "HiddenStateProbe",
    "SamplingAgreementDetector",
    "TokenConfidenceDetector",
    "hidden_states_at_last_answer_token",
    "token_confidence_features",
    "train_logistic_regression",
]

#: Columns of :func:`token_confidence_features`, each oriented "higher = more likely hallucinated".
CONFIDENCE_STATISTICS: tuple[str, ...] = ("mean_logprob", "min_logprob", "mean_entropy", "perplexity")


def _batches(n: int, size: int) -> list[range]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size={size!r} must be a positive integer.")
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _forward(model: nn.Module, ids: torch.Tensor, att: torch.Tensor, **extra: Any) -> Any:
    pos = (att.long().cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False, **extra)


# ---------------------------------------------------------------------------------------------
# Token confidence
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def token_confidence_features(
    model: nn.Module, examples: Sequence[ScoredExample], *, batch_size: int = 8
) -> np.ndarray:
    """The four confidence statistics of each answer, from one teacher-forced forward.

    Args:
        model: The base causal LM.
        examples: ``N`` examples; answers need at least one token (an empty answer gives NaN).
        batch_size: Sequences per forward pass (right padding; results do not depend on it up to
            floating-point noise).

    Returns:
        ``float64 [N, 4]``, columns :data:`CONFIDENCE_STATISTICS`: ``-mean log p``, ``-min log p``,
        mean entropy (nats), perplexity ``exp(-mean log p)``. Higher = less confident.
    """
    out = np.full((len(examples), len(CONFIDENCE_STATISTICS)), np.nan, dtype=np.float64)
    dev = input_device(model)
    pad = pad_token_id(model, eos_fallback=True, default=0)
    for rows in _batches(len(examples), batch_size):
        batch = [examples[i] for i in rows]
        ids, att, _ = batch_examples(batch, pad)
        # Logits only from the first answer's predicting position on (not the whole prompt's [S, V]).
        first = min((len(e.prompt_ids) for e in batch if e.answer_ids), default=ids.shape[1])
        keep = max(1, ids.shape[1] - first + 1)
        att = att.to(dev)
        logits = model(input_ids=ids.to(dev), **forward_kwargs(model, att, logits_to_keep=keep)).logits
        offset = ids.shape[1] - logits.shape[1]  # 0 when the model ignores logits_to_keep
        for j, (i, e) in enumerate(zip(rows, batch)):
            p = len(e.prompt_ids)
            k = len(e.answer_ids)
            if k == 0:
                continue
            lp = torch.log_softmax(logits[j, p - 1 - offset : p - 1 - offset + k].float(), dim=-1)  # [k, V]
            tok = lp.gather(-1, ids[j, p : p + k].to(dev).unsqueeze(-1)).squeeze(-1)  # [k]
            ent = -(lp.exp() * lp).sum(-1)
            mean = float(tok.mean())
            out[i] = (-mean, -float(tok.min()), float(ent.mean()), math.exp(min(-mean, 700.0)))
    return out


class TokenConfidenceDetector(Detector):
    """Token-probability confidence (training-free). See the module table for the statistics.

    Args:
        statistic: One of :data:`CONFIDENCE_STATISTICS`.
        batch_size: Sequences per forward pass in :meth:`featurize`.
    """

    def __init__(self, statistic: str = "mean_logprob", *, batch_size: int = 8) -> None:
        if statistic not in CONFIDENCE_STATISTICS:
            raise ValueError(
                f"statistic={statistic!r} is not supported; use one of {', '.join(map(repr, CONFIDENCE_STATISTICS))}."
            )
        self.statistic = statistic
        self.batch_size = batch_size
        self.name = {
            "mean_logprob": "token confidence: -mean log-prob",
            "min_logprob": "token confidence: -min log-prob",
            "mean_entropy": "token confidence: mean entropy",
            "perplexity": "token confidence: perplexity",
        }[statistic]
        self.score_range = "[1, inf)" if statistic == "perplexity" else "[0, inf)"

    @property
    def feature_key(self) -> str:
        return f"token_confidence:bs{self.batch_size}"

    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> np.ndarray:
        """``float64 [N, 4]``: :func:`token_confidence_features`."""
        return token_confidence_features(model, examples, batch_size=self.batch_size)

    def score(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(CONFIDENCE_STATISTICS):
            raise ValueError(f"features must be [N, 4] from token_confidence_features(), got shape {f.shape}.")
        return f[:, CONFIDENCE_STATISTICS.index(self.statistic)].copy()


# ---------------------------------------------------------------------------------------------
# Sampling agreement
# ---------------------------------------------------------------------------------------------


class SamplingAgreementDetector(Detector):
    """SelfCheckGPT-style disagreement between ``n`` sampled answers and the greedy answer.

    ``score = 1 - mean_i token_F1(sample_i, answer)``, in ``[0, 1]``; higher = the samples
    disagree more with the answer = more likely hallucinated. The samples are drawn with
    ``generate(do_sample=True, temperature, num_return_sequences=n)`` from the prompt, with a
    seed derived from ``(seed, prompt tokens)`` (so results do not depend on example order) and
    without touching the global RNG state.

    Args:
        n: Samples per prompt (>= 2; 5 in ``evaluation.md``).
        temperature: Sampling temperature.
        max_new_tokens: Length cap of each sample.
        seed: Base seed.
        postprocess: Applied to each decoded sample (default: first line, stripped -- the same
            cleaning as the generated protocol's answers).
        generate_kwargs: Extra ``generate`` kwargs (e.g. ``top_p``).
        stop_at_answer_line: End each sample at the end of its first non-empty line
            (:class:`~hf_flowcheck.stopping.AnswerLineStop`). Default: on when ``postprocess`` is
            :func:`~hf_flowcheck.data.clean_generation`, which keeps only that line anyway, so the
            scores are the same and sampling stops as soon as all samples have their answer.

    Raises:
        ValueError: ``n < 2`` or ``temperature <= 0``.
    """

    name = "sampling agreement"
    score_range = "[0, 1]"

    def __init__(
        self,
        n: int = 5,
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        seed: int = 0,
        postprocess: Callable[[str], str] | None = clean_generation,
        generate_kwargs: dict[str, Any] | None = None,
        stop_at_answer_line: bool | None = None,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(
                f"SamplingAgreementDetector needs n >= 2 samples to measure agreement, got n={n!r}; use n=5 "
                "(evaluation.md) or more."
            )
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0 (sampling); 1.0 is the reference setting.")
        self.n, self.temperature, self.max_new_tokens, self.seed = n, float(temperature), int(max_new_tokens), int(seed)
        self.postprocess = postprocess
        self.generate_kwargs = dict(generate_kwargs or {})
        if stop_at_answer_line is None:
            stop_at_answer_line = postprocess is clean_generation
        self.stop_at_answer_line = bool(stop_at_answer_line)
        self._line_stops: dict[int, AnswerLineStop] = {}  # per tokenizer: the vocabulary scan runs once
        self.name = f"sampling agreement (n={n})"

    def _seed_for(self, ex: ScoredExample) -> int:
        h = hashlib.sha256(f"{self.seed}\x00{ex.prompt_ids}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)

    @torch.no_grad()
    def samples(self, model: nn.Module, example: ScoredExample, tokenizer: Any) -> list[str]:
        """The ``n`` post-processed sampled answers of one example."""
        dev = input_device(model)
        ids = torch.tensor([example.prompt_ids], dtype=torch.long, device=dev)
        pad = pad_token_id(model, tokenizer, eos_fallback=True, default=0)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self._seed_for(example))
            kwargs: dict[str, Any] = {
                "do_sample": True,
                "temperature": self.temperature,
                "top_k": 0,  # plain temperature sampling unless generate_kwargs say otherwise
                "num_return_sequences": self.n,
                "max_new_tokens": self.max_new_tokens,
                "pad_token_id": pad,
                **self.generate_kwargs,
            }
            if self.stop_at_answer_line and supports_answer_line_stop(tokenizer) and "stopping_criteria" not in kwargs:
                if id(tokenizer) not in self._line_stops:
                    self._line_stops[id(tokenizer)] = AnswerLineStop(tokenizer)
                kwargs["stopping_criteria"] = [self._line_stops[id(tokenizer)].for_prompt(ids.shape[1])]
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        texts = tokenizer.batch_decode(seqs[:, ids.shape[1] :], skip_special_tokens=True)
        return [self.postprocess(t) if self.postprocess is not None else t for t in texts]

    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> np.ndarray:
        """Disagreement ``float64[N]`` (the score itself).

        Raises:
            ValueError: No tokenizer (samples are compared as text).
        """
        if tokenizer is None:
            raise ValueError(
                "SamplingAgreementDetector compares sampled answers as text; pass tokenizer=... to featurize()."
            )
        out = np.empty(len(examples), dtype=np.float64)
        for i, ex in enumerate(examples):
            answer = ex.answer or tokenizer.decode(ex.answer_ids, skip_special_tokens=True)
            if self.postprocess is not None:
                answer = self.postprocess(answer)
            f1 = [token_f1(s, answer) for s in self.samples(model, ex, tokenizer)]
            out[i] = 1.0 - float(np.mean(f1))
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64).reshape(-1).copy()


# ---------------------------------------------------------------------------------------------
# Answer length
# ---------------------------------------------------------------------------------------------


class AnswerLengthDetector(Detector):
    """Answer length in tokens: the leakage control of the paired protocol (``evaluation.md``).

    On HaluEval QA pairs the hallucinated answers are long sentences and the right answers short
    spans, so length alone reaches AUROC ~0.97; show it next to every paired result. It is not a
    detector for the generated protocol (``protocols = ("paired",)``).
    """

    name = "answer length (tokens)"
    score_range = "[0, inf)"
    protocols = ("paired",)

    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> np.ndarray:
        return np.asarray([float(len(e.answer_ids)) for e in examples], dtype=np.float64)

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64).reshape(-1).copy()


# ---------------------------------------------------------------------------------------------
# Baselines read from flow features (no extra forward pass)
# ---------------------------------------------------------------------------------------------


def pooled_flow_features(features: Any) -> torch.Tensor:
    """Per-channel mean and max over each answer's events, signed-log scaled: the pooled-flow baseline's input.

    A logistic regression on these (:func:`train_logistic_regression`) is the simplest detector the
    flow features allow; the results pages report it as "pooled flow + LR".

    Args:
        features: :class:`~hf_flowcheck.FlowFeatures` with ``values [N, B, T, F]``, ``valid [N, B, T]``.

    Returns:
        ``[N, 2F]``: the ``F`` means, then the ``F`` maxima (zeros for an answer without events).
    """
    x = torch.sign(features.values) * torch.log1p(features.values.abs())
    m = features.valid[..., None].float()
    cnt = m.sum((1, 2))  # [N, 1]
    mean = (x * m).sum((1, 2)) / cnt.clamp_min(1)
    mx = x.masked_fill(m == 0, -1e9).amax((1, 2))
    mx = torch.where(cnt > 0, mx, torch.zeros_like(mx))
    return torch.cat([mean, mx], -1)


def final_readout_confidence(features: Any) -> torch.Tensor | None:
    """``[N]`` -mean log of the final readout's top-1 probability over each answer's tokens (higher = less sure).

    Read from the lens channel ``lens_top1`` at the last block, so it is the readout one position
    later than exact token confidence (:func:`token_confidence_features`): at each answer token, how
    sure the model is of the *next* token. ``None`` for features without lens channels; ``nan`` for
    an answer without events.
    """
    if "lens_top1" not in features.names:
        return None
    top1 = features.values[..., features.names.index("lens_top1")][:, -1]
    valid = features.valid[:, -1]
    n_tok = valid.sum(-1)
    out = -(torch.log(top1.clamp_min(1e-12)) * valid).sum(-1) / n_tok.clamp_min(1)
    return torch.where(n_tok > 0, out, torch.full_like(out, float("nan")))


# ---------------------------------------------------------------------------------------------
# Hidden-state probe (SAPLMA-style)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def hidden_states_at_last_answer_token(
    model: nn.Module, examples: Sequence[ScoredExample], *, batch_size: int = 8
) -> torch.Tensor:
    """Hidden states of every layer at each example's last answer token.

    Returns:
        ``float32 [N, B + 1, d]`` on the CPU (``hidden_states`` of the model: embeddings, then
        the output of each of the ``B`` blocks; the last one is after the final norm in most
        transformers models). Examples with an empty answer use the last prompt token.
    """
    dev = input_device(model)
    pad = pad_token_id(model, eos_fallback=True, default=0)
    parts: list[torch.Tensor] = []
    for rows in _batches(len(examples), batch_size):
        batch = [examples[i] for i in rows]
        ids, att, _ = batch_examples(batch, pad)
        out = _forward(model, ids.to(dev), att.to(dev), output_hidden_states=True)
        hs = torch.stack(out.hidden_states, dim=1)  # [n, B+1, S, d]
        last = torch.tensor([e.length - 1 for e in batch], device=hs.device)
        parts.append(hs[torch.arange(len(batch), device=hs.device), :, last].float().cpu())
    if not parts:
        raise ValueError("hidden_states_at_last_answer_token() got no examples.")
    return torch.cat(parts)


def train_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS (full batch, deterministic).

    Args:
        x: ``[N, F]`` features (standardise them first).
        y: ``[N]`` 0/1 labels.
        l2: Penalty ``l2/2 * ‖w‖²`` added to the mean log-loss.
        max_iter: L-BFGS iterations.

    Returns:
        ``(w [F], b [])``: ``P(y=1) = sigmoid(x @ w + b)``.
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


class _MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class HiddenStateProbe(
    Detector,
    SavedDetectorMixin,
    ModelHubMixin,
    library_name="hf_flowcheck",
    tags=["hf_flowcheck", "hallucination-detection", "hidden-state-probe"],
):
    """SAPLMA-style probe on one layer's hidden state at the last answer token.

    :meth:`fit` trains one probe per candidate layer on the training split and keeps the layer
    with the best validation AUROC (without a validation split: the training AUROC, which
    overfits -- pass one). Features are standardised with training statistics.

    Args:
        layers: Candidate layers (indices into the ``B + 1`` hidden states, negatives from the
            end) or ``"all"``.
        kind: ``"logistic"`` (L2 logistic regression, L-BFGS) or ``"mlp"`` (one hidden layer, AdamW).
        l2: L2 penalty (logistic) / weight decay (MLP).
        hidden: MLP width.
        epochs: MLP epochs.
        seed: MLP initialisation seed.
        batch_size: Sequences per forward pass in :meth:`featurize`.

    Score direction: ``P(hallucinated)`` in ``[0, 1]``, higher = more likely hallucinated.

    A fitted probe saves, loads and pushes like every hf_flowcheck detector
    (``save_pretrained``/``from_pretrained``/``push_to_hub``); :meth:`set_base_model` records the
    model its hidden states came from, and loading with ``base_model=`` checks it.
    """

    trainable = True
    score_range = "[0, 1]"
    FORMAT_VERSION = 1
    CONFIG_KEY = "probe_config"
    WHAT = "hidden-state probe"

    def __init__(
        self,
        layers: Sequence[int] | str = "all",
        *,
        kind: str = "logistic",
        l2: float = 1e-2,
        hidden: int = 64,
        epochs: int = 200,
        seed: int = 0,
        batch_size: int = 8,
    ) -> None:
        if kind not in ("logistic", "mlp"):
            raise ValueError(f"kind={kind!r} is not supported; use 'logistic' or 'mlp'.")
        if isinstance(layers, str) and layers != "all":
            raise ValueError(f"layers={layers!r} must be 'all' or a list of layer indices.")
        self.layers = layers if isinstance(layers, str) else [int(i) for i in layers]
        self.kind, self.l2, self.hidden, self.epochs, self.seed = kind, float(l2), int(hidden), int(epochs), int(seed)
        self.batch_size = batch_size
        self.layer: int | None = None
        self.layer_auroc: dict[int, float] = {}
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        self._w: torch.Tensor | None = None
        self._b: torch.Tensor | None = None
        self._mlp: _MLP | None = None
        self.base_fingerprint: dict[str, Any] | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        where = f", layer {self.layer}" if self.layer is not None else ""
        return f"hidden-state probe ({self.kind}{where})"

    @property
    def feature_key(self) -> str:
        return f"hidden_states:bs{self.batch_size}"

    @property
    def is_fitted(self) -> bool:
        return self.layer is not None

    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> torch.Tensor:
        """``float32 [N, B + 1, d]``: :func:`hidden_states_at_last_answer_token`."""
        return hidden_states_at_last_answer_token(model, examples, batch_size=self.batch_size)

    @staticmethod
    def _check(features: Any) -> torch.Tensor:
        x = torch.as_tensor(features)
        if x.dim() != 3:
            raise ValueError(f"features must be [N, B + 1, d] hidden states, got shape {tuple(x.shape)}.")
        return x.to(torch.float32)

    def _candidates(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        out = []
        for i in self.layers:  # type: ignore[union-attr]
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise ValueError(f"probe layer {i} is out of range for {n_layers} hidden states.")
            out.append(j)
        return sorted(set(out))

    def _train_one(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, ...]:
        if self.kind == "logistic":
            return train_logistic_regression(x, y, l2=self.l2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mlp = _MLP(x.shape[1], self.hidden)
            opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=self.l2)
            with torch.enable_grad():
                for _ in range(self.epochs):
                    opt.zero_grad()
                    loss = nn.functional.binary_cross_entropy_with_logits(mlp(x), y.float())
                    loss.backward()
                    opt.step()
        return (mlp.eval(),)

    @staticmethod
    def _apply(model: tuple[Any, ...], x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            if len(model) == 2:
                w, b = model
                logits = x.to(torch.float64) @ w + b
            else:
                logits = model[0](x).to(torch.float64)
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def fit(  # type: ignore[override]
        self, features: Any, labels: Any, val_features: Any = None, val_labels: Any = None
    ) -> HiddenStateProbe:
        """Train a probe per candidate layer; keep the best layer on validation AUROC.

        Args:
            features: ``[N, B + 1, d]`` training hidden states.
            labels: ``[N]`` 0/1.
            val_features: ``[M, B + 1, d]`` validation hidden states (selects the layer).
            val_labels: ``[M]``.

        Raises:
            ValueError: A split lacks one of the two classes, or shapes disagree.
        """
        x = self._check(features)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if len(set(y.tolist())) != 2:
            raise ValueError(
                f"The training labels hold only class(es) {sorted(set(y.tolist()))}; the probe needs both 0 and 1."
            )
        vx = self._check(val_features) if val_features is not None else None
        vy = np.asarray(val_labels, dtype=np.int64).reshape(-1) if val_labels is not None else None
        if vx is not None and (vy is None or len(set(vy.tolist())) != 2):
            raise ValueError("val_labels must be given and hold both classes 0 and 1 to select the probe's layer.")
        mean = x.mean(0)
        std = x.std(0, unbiased=False).clamp_min(1e-6)
        best, best_layer, best_model = -math.inf, None, None
        self.layer_auroc = {}
        for layer in self._candidates(x.shape[1]):
            xt = (x[:, layer] - mean[layer]) / std[layer]
            model = self._train_one(xt, y)
            if vx is not None:
                s = self._apply(model, (vx[:, layer] - mean[layer]) / std[layer])
                a = auroc(vy, s)  # type: ignore[arg-type]
            else:
                a = auroc(y.numpy(), self._apply(model, xt))
            self.layer_auroc[layer] = float(a)
            if a > best:
                best, best_layer, best_model = a, layer, model
        assert best_layer is not None and best_model is not None
        self.layer = best_layer
        self._mean, self._std = mean[best_layer], std[best_layer]
        if len(best_model) == 2:
            self._w, self._b, self._mlp = best_model[0], best_model[1], None
        else:
            self._w = self._b = None
            self._mlp = best_model[0]
        return self

    # ---------------------------------------------------------------------- compatibility
    def set_base_model(self, model: nn.Module) -> None:
        """Record ``model``'s fingerprint (checked by :meth:`check_compatible` and loading)."""
        from hf_flowcheck.fingerprint import model_fingerprint

        self.base_fingerprint = model_fingerprint(model)

    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`~hf_flowcheck.errors.FingerprintMismatchError` unless ``model`` is the base model."""
        from hf_flowcheck.fingerprint import check_fingerprint

        if self.base_fingerprint is None:
            raise ValueError(
                "This probe has no base-model fingerprint; call probe.set_base_model(model) with the model whose "
                "hidden states it was fitted on."
            )
        check_fingerprint(self.base_fingerprint, model, what="hidden-state probe")

    # -------------------------------------------------------------------------------- I/O
    def check_saveable(self) -> None:
        self.require_fitted()

    def config_dict(self) -> dict[str, Any]:
        settings = {
            "layers": self.layers,
            "kind": self.kind,
            "l2": self.l2,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }
        return {
            "probe_config": settings,
            "layer": self.layer,
            "layer_auroc": jsonable({str(k): v for k, v in self.layer_auroc.items()}, "layer_auroc"),
            "base_fingerprint": jsonable(self.base_fingerprint, "base_fingerprint"),
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], **model_kwargs: Any) -> HiddenStateProbe:
        settings = config.get("probe_config")
        if not isinstance(settings, dict):
            raise ValueError("probe_config must be a dict of the probe's settings")
        probe = cls(**settings)
        layer = config.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer={layer!r} must be the index of the selected hidden state")
        probe.layer = layer
        probe.layer_auroc = {
            int(k): float("nan") if v is None else float(v) for k, v in (config.get("layer_auroc") or {}).items()
        }
        probe.base_fingerprint = config.get("base_fingerprint")
        return probe

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self._mean is not None and self._std is not None
        out = {"mean": self._mean, "std": self._std}
        if self._mlp is None:
            out.update(weight=self._w, bias=torch.as_tensor(self._b).reshape(1))
        else:
            out.update({f"mlp.{k}": v for k, v in self._mlp.state_dict().items()})
        return out

    def load_state_tensors(self, path: str, *, map_location: str = "cpu", strict: bool = True) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from hf_flowcheck.errors import CheckpointError

        try:
            state = load_file(path, device=str(map_location))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path!r} is not a readable safetensors file ({err}); re-save the probe.") from err
        want = {"mean", "std"} | (
            {"weight", "bias"}
            if self.kind == "logistic"
            else {"mlp.net.0.weight", "mlp.net.0.bias", "mlp.net.2.weight", "mlp.net.2.bias"}
        )
        if set(state) != want:
            raise CheckpointError(
                f"{path!r} holds {sorted(state)}, but a {self.kind} probe needs {sorted(want)}; the files do not match."
            )
        bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"The weights in {path!r} hold NaN/inf in {bad}; the checkpoint is broken.")
        d = state["mean"].numel()
        if state["std"].shape != state["mean"].shape or (self.kind == "logistic" and state["weight"].numel() != d):
            raise CheckpointError(f"{path!r} has inconsistent shapes; re-save the probe.")
        self._mean, self._std = state["mean"], state["std"]
        if self.kind == "logistic":
            self._w, self._b, self._mlp = state["weight"].to(torch.float64), state["bias"].to(torch.float64)[0], None
        else:
            self._mlp = _MLP(d, self.hidden)
            self._mlp.load_state_dict({k[len("mlp.") :]: v for k, v in state.items() if k.startswith("mlp.")})
            self._mlp.eval()
            self._w = self._b = None

    def model_card_text(self) -> str:
        fp = self.base_fingerprint or {}
        base_id = fp.get("base_id")
        lines = card_front_matter(("hf_flowcheck", "hallucination-detection", "hidden-state-probe"))
        lines += [f"# Hidden-state probe{' for ' + base_id if base_id else ''}", ""]
        lines += [
            f"A {self.kind} probe on hidden state {self.layer} (of the B + 1 residual states) at the last answer "
            "token, standardised with training statistics; the layer was chosen on validation AUROC. "
            "`score` = P(hallucinated) in [0, 1]; **higher = more likely hallucinated**.",
            "",
            "## Base model",
            "",
        ]
        lines += fingerprint_table(fp)
        lines += ["", f"Written by hf_flowcheck {__version__} (format version {self.FORMAT_VERSION}).", ""]
        return "\n".join(lines)

    def score(self, features: Any) -> np.ndarray:
        """``P(hallucinated)`` ``float64[N]`` from the selected layer.

        Raises:
            hf_flowcheck.detectors.base.NotFittedError: Before :meth:`fit`.
        """
        self.require_fitted()
        x = self._check(features)
        assert self.layer is not None and self._mean is not None and self._std is not None
        if self.layer >= x.shape[1]:
            raise ValueError(f"features have {x.shape[1]} layers but the probe uses layer {self.layer}.")
        xt = (x[:, self.layer] - self._mean) / self._std
        model = (self._w, self._b) if self._mlp is None else (self._mlp,)
        return self._apply(model, xt)
