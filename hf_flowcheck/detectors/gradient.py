"""Gradient signatures ("Grad Detect", design ``gradient-signatures.md``) and the detector reading them.

One forward-backward pass per (prompt, answer): the loss is the mean negative log-likelihood of
the answer tokens given the prompt, teacher-forced on the model's own answer, so no label is
needed at inference. The backward pass stops at the residual stream entering the first selected
block (the last ``layers=5`` blocks by default): that tensor is detached, only the selected
blocks' norm parameters require grad for the duration, and gradients are taken with
:func:`torch.autograd.grad` -- nothing is left in ``.grad`` and every parameter's
``requires_grad`` is restored in ``finally``.

The gradient of a block is the gradients of its norm parameters, concatenated with a seeded
low-rank sketch of each linear weight's gradient. For a linear map with input activations
``x_t`` and output gradients ``δ_t`` (``t`` over the positions), the weight gradient is
``G = Σ_t δ_t x_tᵀ``; its sketch ``S = Σ_t (P δ_t)(Q x_t)ᵀ = P G Qᵀ`` uses fixed Gaussian
``P [k, out]``, ``Q [k, in]`` with entries ``N(0, 1/k)`` (``k = sketch``), so that
``E[<S₁, S₂>] = <G₁, G₂>``: inner products -- hence cosine similarities -- are preserved in
expectation, and ``G`` is never formed (``Q x_t`` is kept in the forward hook, ``P δ_t`` is
computed in a tensor hook on the output). ``sketch=None`` gives the exact ``G`` (small models).

:class:`GradientDetector` keeps one reference gradient per class and layer (the mean of the
training signatures of that class), turns each layer into ``[cos(g_b, ref_c,b) for c] +
[log ‖g_b‖]`` and reads the sequence of layers with a small transformer encoder (or logistic
regression) into class logits. ``score`` is the probability of the hallucinated class: **in
[0, 1], higher = more likely hallucinated**.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
    ...     num_attention_heads=4, intermediate_size=37)).eval()
    >>> ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    >>> answer = torch.tensor([[0, 0, 0, 1, 1, 1]])
    >>> sig = gradient_signature(lm, ids, None, answer, GradientConfig(layers=2, sketch=4))
    >>> tuple(sig.shape)  # 2 blocks x (2 norms x 32 + 7 linears x 4 x 4)
    (2, 176)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from hf_flowcheck.architectures import resolve_architecture, unwrap_model
from hf_flowcheck.configuration import check_positive_int
from hf_flowcheck.detectors.base import Detector, NotFittedError, ScoredExample
from hf_flowcheck.detectors.checkpoint import SavedDetectorMixin, fingerprint_table, jsonable
from hf_flowcheck.errors import GradientSignatureError
from hf_flowcheck.fingerprint import CHECKED_FIELDS, check_fingerprint, model_fingerprint
from hf_flowcheck.model_io import accepts, input_device
from hf_flowcheck.version import __version__

__all__ = [
    "ABSTENTION_PATTERNS",
    "CLASS_NAMES",
    "GradientConfig",
    "GradientDetector",
    "GradientSignatureError",
    "abstention_labels",
    "gradient_signature",
    "gradient_signatures",
    "is_abstention",
    "signature_features",
    "sketch_matrix",
    "sketch_weight_gradient",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
CLASS_NAMES: tuple[str, ...] = ("correct", "hallucinated", "did_not_answer")
READERS: tuple[str, ...] = ("transformer", "logistic")

#: Default "did not answer" matcher (case-insensitive regular expressions, searched in the answer).
ABSTENTION_PATTERNS: tuple[str, ...] = (
    r"\bi (?:do not|don'?t) know\b",
    r"\bi(?: am|'m) not (?:sure|certain)\b",
    r"\bi(?: am|'m)? ?(?:unable|not able) to (?:answer|say|determine|tell)\b",
    r"\b(?:cannot|can'?t|could not|couldn'?t) (?:be )?(?:answer|say|determine|know|tell)",
    r"\bno (?:definite|definitive|clear|known|certain) answer\b",
    r"\b(?:not|no) (?:enough|sufficient) information\b",
    r"\b(?:unanswerable|unknowable)\b",
    r"\bnobody knows\b",
    r"\bit is (?:unknown|unclear)\b",
)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class GradientConfig:
    """How gradient signatures are computed and read (defaults of ``gradient-signatures.md``).

    Example:
        >>> GradientConfig().select_blocks(30)
        [25, 26, 27, 28, 29]
        >>> GradientConfig(layers=[0, -1]).select_blocks(4)
        [0, 3]
    """

    FORMAT_VERSION: ClassVar[int] = 1

    layers: int | list[int] | str = field(
        default=5,
        metadata={
            "help": "Blocks whose gradients are taken: an int n (the last n blocks), a list of block indices "
            "(negative counts from the end), or 'all'."
        },
    )
    sketch: int | None = field(
        default=32,
        metadata={
            "help": "Rows k of the Gaussian sketches P, Q of each linear weight's gradient (k*k numbers per "
            "linear); None = exact full weight gradients (small models only)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sketches and of the reader's training."})
    classes: int = field(
        default=2,
        metadata={"help": "2 (correct / hallucinated) or 3 (+ did-not-answer, found by abstention_patterns)."},
    )
    reader: str = field(
        default="transformer",
        metadata={"help": "'transformer' (small encoder over the layer sequence) or 'logistic' (regression)."},
    )
    d_model: int = field(default=64, metadata={"help": "Transformer reader width."})
    reader_layers: int = field(default=2, metadata={"help": "Transformer reader encoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Transformer reader attention heads (divides d_model)."})
    dropout: float = field(default=0.1, metadata={"help": "Transformer reader dropout, in [0, 1)."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the reader."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the reader."})
    epochs: int = field(default=200, metadata={"help": "Maximum training epochs of the reader."})
    batch_size: int = field(default=64, metadata={"help": "Reader mini-batch size."})
    patience: int = field(
        default=30, metadata={"help": "Stop after this many epochs without a better validation score."}
    )
    abstention_patterns: tuple[str, ...] = field(
        default=ABSTENTION_PATTERNS,
        metadata={
            "help": "Case-insensitive regular expressions; an answer matching any is 'did not answer' "
            "(class 2) when classes=3."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(
                    f"GradientConfig.layers={self.layers!r} is not supported; use an int n (last n blocks), a list "
                    "of block indices, or 'all'."
                )
        elif isinstance(self.layers, int) and not isinstance(self.layers, bool):
            check_positive_int("layers", self.layers, "GradientConfig")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(
                    f"GradientConfig.layers={self.layers!r} must be a non-empty list of int block indices."
                )
            self.layers = [int(i) for i in self.layers]
        else:
            raise ValueError(f"GradientConfig.layers={self.layers!r} must be an int, a list of ints or 'all'.")
        if self.sketch is not None:
            check_positive_int("sketch", self.sketch, "GradientConfig")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"GradientConfig.seed={self.seed!r} must be an int.")
        if self.classes not in (2, 3):
            raise ValueError(f"GradientConfig.classes={self.classes!r} must be 2 or 3.")
        if self.reader not in READERS:
            raise ValueError(f"GradientConfig.reader={self.reader!r} must be one of {', '.join(map(repr, READERS))}.")
        for name in ("d_model", "reader_layers", "num_heads", "epochs", "batch_size", "patience"):
            check_positive_int(name, getattr(self, name), "GradientConfig")
        if self.d_model % self.num_heads:
            raise ValueError(f"GradientConfig.num_heads={self.num_heads} must divide d_model={self.d_model}.")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1) or isinstance(self.dropout, bool):
            raise ValueError(f"GradientConfig.dropout={self.dropout!r} must be a number in [0, 1).")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(
                    f"GradientConfig.{name}={v!r} must be a {'positive' if name == 'lr' else 'non-negative'} number."
                )
        if isinstance(self.abstention_patterns, str):
            raise ValueError(
                "GradientConfig.abstention_patterns must be a sequence of regular expressions, not one string."
            )
        self.abstention_patterns = tuple(self.abstention_patterns)
        for p in self.abstention_patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(
                    f"GradientConfig.abstention_patterns holds an invalid regular expression {p!r}: {err}."
                ) from None
        self.dropout, self.lr, self.weight_decay = float(self.dropout), float(self.lr), float(self.weight_decay)

    def select_blocks(self, num_blocks: int) -> list[int]:
        """Sorted indices of the selected blocks of a model with ``num_blocks`` blocks.

        Raises:
            ValueError: ``layers`` asks for more blocks than exist, or an index is out of range.
        """
        if self.layers == "all":
            return list(range(num_blocks))
        if isinstance(self.layers, int):
            if self.layers > num_blocks:
                raise ValueError(
                    f"GradientConfig.layers={self.layers} asks for the last {self.layers} blocks but the model has "
                    f"{num_blocks}; use layers<={num_blocks} or layers='all'."
                )
            return list(range(num_blocks - self.layers, num_blocks))
        out = set()
        for i in self.layers:  # type: ignore[union-attr]
            j = i + num_blocks if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(
                    f"GradientConfig.layers holds block index {i}, out of range for a model with {num_blocks} blocks."
                )
            out.add(j)
        return sorted(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with version stamps."""
        out = dataclasses.asdict(self)
        out["abstention_patterns"] = list(self.abstention_patterns)
        out["format_version"] = self.FORMAT_VERSION
        out["hf_flowcheck_version"] = __version__
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | GradientConfig) -> GradientConfig:
        """Inverse of :meth:`to_dict`; unknown keys and newer format versions are refused."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"GradientConfig.from_dict() needs a dict, got {type(data).__name__}.")
        data = dict(data)
        fmt = data.pop("format_version", cls.FORMAT_VERSION)
        data.pop("hf_flowcheck_version", None)
        if fmt > cls.FORMAT_VERSION:
            raise ValueError(
                f"GradientConfig format_version {fmt} is newer than this hf_flowcheck understands "
                f"({cls.FORMAT_VERSION}); upgrade hf_flowcheck."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown GradientConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Abstention (the third class)
# ---------------------------------------------------------------------------------------------


def is_abstention(answer: str, patterns: Sequence[str] = ABSTENTION_PATTERNS) -> bool:
    """Whether ``answer`` declines to answer ("I don't know", "cannot be determined", ...).

    Example:
        >>> is_abstention("I don't know."), is_abstention("Paris")
        (True, False)
    """
    return any(re.search(p, answer, flags=re.IGNORECASE) for p in patterns)


def abstention_labels(
    labels: Sequence[int] | np.ndarray, answers: Sequence[str], patterns: Sequence[str] = ABSTENTION_PATTERNS
) -> np.ndarray:
    """3-class labels: 2 where the answer is an abstention, else the 0/1 label.

    Returns:
        ``int64[N]`` in ``{0, 1, 2}``.
    """
    y = np.asarray(labels, dtype=np.int64).copy()
    if len(answers) != y.shape[0]:
        raise ValueError(f"labels ({y.shape[0]}) and answers ({len(answers)}) differ in length.")
    for i, a in enumerate(answers):
        if is_abstention(a, patterns):
            y[i] = 2
    return y


# ---------------------------------------------------------------------------------------------
# The signature
# ---------------------------------------------------------------------------------------------


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))


@dataclass
class _Linear:
    name: str
    module: nn.Module
    in_features: int
    out_features: int


@dataclass
class _BlockPlan:
    index: int
    module: nn.Module
    norm_params: list[tuple[str, nn.Parameter]]
    linears: list[_Linear]

    def dim(self, sketch: int | None) -> int:
        n = sum(p.numel() for _, p in self.norm_params)
        if sketch is None:
            return n + sum(lin.in_features * lin.out_features for lin in self.linears)
        return n + len(self.linears) * sketch * sketch


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    if isinstance(m, nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])  # transformers Conv1D: weight [in, out]


def _block_plan(index: int, block: nn.Module) -> _BlockPlan:
    norms: list[tuple[str, nn.Parameter]] = []
    linears: list[_Linear] = []
    for name, m in block.named_modules():
        if _is_linear(m):
            i, o = _linear_dims(m)
            linears.append(_Linear(name, m, i, o))
        elif _is_norm(m):
            norms.extend((f"{name}.{pn}", p) for pn, p in m.named_parameters(recurse=False))
    return _BlockPlan(index, block, norms, linears)


_PROJ_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_PROJ_CACHE_MAX = 4096


def _projection(seed: int, block: int, name: str, which: str, k: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed Gaussian ``[k, dim]`` with entries ``N(0, 1/k)``, a function of ``(seed, block, name, which)``."""
    key = (seed, block, name, which, k, dim, str(device))
    hit = _PROJ_CACHE.get(key)
    if hit is not None:
        return hit
    digest = hashlib.sha256(f"{seed}\x00{block}\x00{name}\x00{which}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    mat = (torch.randn(k, dim, generator=gen, dtype=torch.float32) / math.sqrt(k)).to(device)
    if len(_PROJ_CACHE) >= _PROJ_CACHE_MAX:
        _PROJ_CACHE.pop(next(iter(_PROJ_CACHE)))
    _PROJ_CACHE[key] = mat
    return mat


def sketch_matrix(k: int, dim: int, *, seed: int = 0, block: int = 0, name: str = "", which: str = "P") -> torch.Tensor:
    """The fixed Gaussian sketch used for one side of one linear weight.

    Args:
        k: Sketch rows (``GradientConfig.sketch``).
        dim: Side length (``out_features`` for ``P``, ``in_features`` for ``Q``).
        seed: ``GradientConfig.seed``.
        block: Block index of the linear.
        name: The linear's module path inside its block (e.g. ``"mlp.down_proj"``).
        which: ``"P"`` (output side) or ``"Q"`` (input side).

    Returns:
        ``float32 [k, dim]`` (CPU) with i.i.d. ``N(0, 1/k)`` entries, so ``E[PᵀP] = I``.
    """
    if which not in ("P", "Q"):
        raise ValueError(f"which={which!r} must be 'P' or 'Q'.")
    return _projection(seed, block, name, which, k, dim, torch.device("cpu")).clone()


def sketch_weight_gradient(
    x: torch.Tensor, delta: torch.Tensor, p: torch.Tensor | None = None, q: torch.Tensor | None = None
) -> torch.Tensor:
    """Sketch ``S = Σ_t (P δ_t)(Q x_t)ᵀ = P G Qᵀ`` of a linear weight's gradient ``G = Σ_t δ_t x_tᵀ``.

    The reference math of what :func:`gradient_signature` computes with hooks (``Q x_t`` in the
    forward hook, ``P δ_t`` in the backward hook), never forming ``G`` when ``P`` and ``Q`` are given.

    Args:
        x: ``[T, in]`` input activations of the linear.
        delta: ``[T, out]`` gradients of the loss with respect to its outputs.
        p: ``[k, out]`` output-side sketch, or ``None`` (no sketch on that side).
        q: ``[k, in]`` input-side sketch, or ``None``.

    Returns:
        ``[k, k]`` (both sketches), or ``G`` ``[out, in]`` when both are ``None``.
    """
    left = delta if p is None else delta @ p.T
    right = x if q is None else x @ q.T
    return left.T @ right


def _plans(model: nn.Module, indices: Sequence[int] | None = None) -> list[_BlockPlan]:
    """Norm parameters and linear modules of the blocks (rebuilt per call: adapters may have changed them)."""
    blocks = resolve_architecture(unwrap_model(model)).blocks
    idx = range(len(blocks)) if indices is None else indices
    return [_block_plan(i, blocks[i]) for i in idx]


def _num_blocks(model: nn.Module) -> int:
    return resolve_architecture(unwrap_model(model)).num_blocks


def _as_batch(
    t: torch.Tensor | Sequence[int] | None, name: str, like: torch.Tensor | None = None
) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != 1:
        raise ValueError(
            f"{name} must be [S] or [1, S] (one sample per signature; use gradient_signatures() for many), "
            f"got shape {tuple(t.shape)}."
        )
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(like.shape)}.")
    return t


def gradient_signature(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    config: GradientConfig | None = None,
) -> torch.Tensor:
    """Gradient signature of one (prompt, answer) sequence: one forward-backward pass.

    Args:
        model: A transformers causal LM of a supported architecture (PEFT wrappers are unwrapped).
            Use it in eval mode (dropout would make the signature random).
        input_ids: ``[S]`` or ``[1, S]`` prompt followed by the answer.
        attention_mask: ``[S]``/``[1, S]`` (1 = real token) or ``None`` (all real).
        answer_mask: ``[S]``/``[1, S]``, 1 on the answer tokens; the loss is their mean NLL given
            everything before them (position 0 cannot be predicted and is ignored).
        config: :class:`GradientConfig` (``layers``, ``sketch``, ``seed`` are used here).

    Returns:
        ``float32 [L_sel, D]`` on the model's device: row ``i`` is the gradient of selected block
        ``i`` (sorted block order): its norm parameters' gradients, then each linear weight's
        sketch ``S = P G Qᵀ`` (``[k, k]``, row-major; ``G`` as ``[out, in]``) or, with
        ``sketch=None``, ``G`` itself. Blocks with fewer entries are zero-padded to ``D``.

    Raises:
        ValueError: No answer token, or bad shapes.
        GradientSignatureError: The blocks have no backward in the model's dtype (e.g. float16 on
            CPU), the gradients are not finite, or inference mode is on.
    """
    cfg = config or GradientConfig()
    if torch.is_inference_mode_enabled():
        raise GradientSignatureError(
            "gradient_signature() needs autograd, but torch.inference_mode() is active; call it outside "
            "inference_mode (torch.no_grad() around it is fine: gradients are enabled inside)."
        )
    ids = _as_batch(input_ids, "input_ids")
    assert ids is not None
    att = _as_batch(attention_mask, "attention_mask", ids)
    ans = _as_batch(answer_mask, "answer_mask", ids)
    if ans is None:
        raise ValueError("answer_mask is required: 1 on the answer tokens whose NLL is the loss.")
    att = torch.ones_like(ids) if att is None else att
    targets = (ans[0] != 0) & (att[0] != 0)
    targets[0] = False
    pos = targets.nonzero().flatten()
    if pos.numel() == 0:
        raise ValueError(
            "answer_mask marks no predictable answer token (an empty answer, or only position 0); the loss is the "
            "mean NLL of the answer tokens, so give at least one answer token after the prompt."
        )
    base = unwrap_model(model)
    selected = _plans(base, cfg.select_blocks(_num_blocks(base)))
    device = input_device(base)
    ids, att = ids.to(device), att.to(device)
    pos = pos.to(device)
    seq = ids.shape[1]
    first = int(pos[0]) - 1  # first position whose logits are needed

    params = list(base.parameters())
    saved_rg = [p.requires_grad for p in params]
    norm_params = [p for plan in selected for _, p in plan.norm_params]
    k = cfg.sketch
    acc: dict[tuple[int, int], torch.Tensor] = {}
    handles: list[Any] = []
    entry: dict[str, torch.Tensor] = {}
    valid = att[0].to(torch.float32).view(-1, 1)

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            h = args[0].detach().requires_grad_(True)
            entry["x"] = h
            return (h, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h = kwargs["hidden_states"].detach().requires_grad_(True)
            entry["x"] = h
            return args, {**kwargs, "hidden_states": h}
        return None

    def make_hook(b: int, j: int, lin: _Linear) -> Callable[..., None]:
        def fwd_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = inputs[0].detach().reshape(-1, lin.in_features).to(torch.float32)
            if x.shape[0] == valid.shape[0]:
                x = x * valid
            # [T, in] exact, or [T, k] sketched
            right = x if k is None else x @ _projection(cfg.seed, b, lin.name, "Q", k, lin.in_features, x.device).T

            def grad_hook(g: torch.Tensor) -> None:
                d = g.detach().reshape(-1, lin.out_features).to(torch.float32)
                left = d if k is None else d @ _projection(cfg.seed, b, lin.name, "P", k, lin.out_features, d.device).T
                contrib = left.T @ right  # [out|k, in|k]
                key = (b, j)
                acc[key] = contrib if key not in acc else acc[key] + contrib

            output.register_hook(grad_hook)

        return fwd_hook

    dtype = next(iter(base.parameters())).dtype
    try:
        for p in params:
            p.requires_grad_(False)
        for p in norm_params:
            p.requires_grad_(True)
        handles.append(selected[0].module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for plan in selected:
            for j, lin in enumerate(plan.linears):
                handles.append(lin.module.register_forward_hook(make_hook(plan.index, j, lin)))
        kwargs: dict[str, Any] = {"attention_mask": att, "use_cache": False}
        if accepts(base, "position_ids"):
            kwargs["position_ids"] = (att.long().cumsum(-1) - 1).clamp_min(0)
        keep = seq - first
        if accepts(base, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep
        try:
            with torch.enable_grad():
                out = base(input_ids=ids, **kwargs)
                logits = out.logits[0]
                logits = logits[-keep:] if logits.shape[0] >= keep else logits
                offset = seq - logits.shape[0]
                rows = pos - 1 - offset
                logp = torch.log_softmax(logits[rows].float(), dim=-1)
                loss = -logp.gather(-1, ids[0, pos].unsqueeze(-1)).mean()
                if "x" not in entry:
                    raise GradientSignatureError(
                        f"The first selected block (index {selected[0].index}) was not called with the hidden states "
                        "as its first argument or as hidden_states=, so the backward cannot be stopped there; "
                        "this architecture's blocks are called in an unsupported way."
                    )
                grads = torch.autograd.grad(loss, [entry["x"], *norm_params], allow_unused=True)
        except RuntimeError as err:
            if dtype in (torch.float16, torch.bfloat16):
                raise GradientSignatureError(
                    f"The backward pass through the selected blocks failed in {dtype} on {device.type} "
                    f"({str(err).strip().splitlines()[0]}). Load the model in float32 "
                    "(from_pretrained(..., dtype=torch.float32)) to compute gradient signatures."
                ) from err
            raise
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(params, saved_rg):
            p.requires_grad_(rg)

    norm_grads = grads[1:]
    rows_out: list[torch.Tensor] = []
    gi = 0
    for plan in selected:
        parts = []
        for _, p in plan.norm_params:
            g = norm_grads[gi]
            gi += 1
            parts.append((torch.zeros_like(p) if g is None else g).detach().reshape(-1).to(torch.float32))
        for j, lin in enumerate(plan.linears):
            shape = (lin.out_features, lin.in_features) if k is None else (k, k)
            s = acc.get((plan.index, j))
            parts.append(torch.zeros(shape, device=device).reshape(-1) if s is None else s.reshape(-1).to(device))
        rows_out.append(torch.cat(parts) if parts else torch.zeros(0, device=device))
    width = max(r.numel() for r in rows_out)
    sig = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows_out])
    if not bool(torch.isfinite(sig).all()):
        raise GradientSignatureError(
            f"The gradient signature holds NaN/inf (model dtype {dtype}); the backward overflowed. Load the model in "
            "float32 (from_pretrained(..., dtype=torch.float32))."
        )
    return sig


def gradient_signatures(
    model: nn.Module,
    examples: Sequence[ScoredExample],
    config: GradientConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Gradient signatures of many examples (one forward-backward pass each).

    Args:
        model: The base causal LM.
        examples: ``N`` :class:`~hf_flowcheck.detectors.base.ScoredExample`.
        config: See :func:`gradient_signature`.
        progress: Optional ``callback(done, total)``.

    Returns:
        ``float32 [N, L_sel, D]`` on the CPU.
    """
    out = []
    for i, ex in enumerate(examples):
        ids = torch.tensor([ex.input_ids], dtype=torch.long)
        ans = torch.zeros_like(ids)
        ans[0, len(ex.prompt_ids) :] = 1
        out.append(gradient_signature(model, ids, None, ans, config).cpu())
        if progress is not None:
            progress(i + 1, len(examples))
    if not out:
        raise ValueError("gradient_signatures() got no examples.")
    width = max(s.shape[1] for s in out)
    return torch.stack([torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in out])


# ---------------------------------------------------------------------------------------------
# Features and the reader
# ---------------------------------------------------------------------------------------------


def signature_features(signatures: torch.Tensor, references: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-layer features: cosine similarity to each class reference, and ``log ‖g_b‖``.

    Args:
        signatures: ``[N, L, D]``.
        references: ``[C, L, D]`` class references (per-layer mean training gradients).
        eps: Floor of the norms.

    Returns:
        ``[N, L, C + 1]``: ``cos(g_nb, ref_cb)`` for each class ``c``, then ``log(‖g_nb‖ + eps)``.
    """
    if signatures.dim() != 3 or references.dim() != 3 or signatures.shape[1:] != references.shape[1:]:
        raise ValueError(
            f"signatures [N, L, D] = {tuple(signatures.shape)} and references [C, L, D] = {tuple(references.shape)} "
            "disagree; compute the signatures with the detector's GradientConfig (same layers and sketch)."
        )
    s = signatures.to(torch.float32)
    r = references.to(device=s.device, dtype=torch.float32)
    sn = s.norm(dim=-1)  # [N, L]
    rn = r.norm(dim=-1)  # [C, L]
    dots = torch.einsum("nld,cld->nlc", s, r)
    cos = dots / (sn.unsqueeze(-1).clamp_min(eps) * rn.T.unsqueeze(0).clamp_min(eps))
    return torch.cat([cos, torch.log(sn + eps).unsqueeze(-1)], dim=-1)


class _TransformerReader(nn.Module):
    def __init__(self, num_layers: int, num_inputs: int, num_classes: int, cfg: GradientConfig) -> None:
        super().__init__()
        self.inp = nn.Linear(num_inputs, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(num_layers, cfg.d_model))
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, dim_feedforward=2 * cfg.d_model, dropout=cfg.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.reader_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, F] -> [N, C]
        h = self.encoder(self.inp(x) + self.pos)
        return self.head(self.norm(h.mean(1)))


class _LogisticReader(nn.Module):
    def __init__(self, num_layers: int, num_inputs: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(num_layers * num_inputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from hf_flowcheck.metrics import auroc

    return auroc(y, s)


class GradientDetector(
    nn.Module,
    SavedDetectorMixin,
    PyTorchModelHubMixin,
    Detector,
    library_name="hf_flowcheck",
    tags=["hf_flowcheck", "hallucination-detection", "gradient-signatures"],
):
    """Gradient-signature hallucination (and abstention) detector.

    Args:
        gradient_config: :class:`GradientConfig` or its dict.
        num_layers: ``L_sel``; set by :meth:`fit` (given when loading).
        signature_dim: ``D``; set by :meth:`fit` (given when loading).
        block_indices: The selected block indices (for people and checks).
        base_fingerprint: :func:`hf_flowcheck.fingerprint.model_fingerprint` of the base model.
        training_metadata: JSON-serialisable facts (history, evaluation, command).

    Score direction: :meth:`score` is ``P(hallucinated)`` in ``[0, 1]``, higher = more likely
    hallucinated. With ``classes=3`` :meth:`predict_proba` also gives ``P(did not answer)``.

    Example:
        >>> det = GradientDetector(GradientConfig(reader="logistic", epochs=5))
        >>> g = torch.randn(20, 3, 8); y = torch.arange(20) % 2
        >>> det.fit(g, y, g, y).score(g).shape
        (20,)
    """

    FORMAT_VERSION: ClassVar[int] = 1
    CONFIG_KEY: ClassVar[str] = "gradient_config"
    WHAT: ClassVar[str] = "gradient detector"
    trainable = True
    score_range = "[0, 1]"

    def __init__(
        self,
        gradient_config: GradientConfig | dict | None = None,
        *,
        num_layers: int | None = None,
        signature_dim: int | None = None,
        block_indices: list[int] | None = None,
        base_fingerprint: dict | None = None,
        training_metadata: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = GradientConfig.from_dict(gradient_config if gradient_config is not None else GradientConfig())
        if base_fingerprint is not None and not isinstance(base_fingerprint, dict):
            raise ValueError("base_fingerprint must be a dict from hf_flowcheck.fingerprint.model_fingerprint().")
        if training_metadata is not None and not isinstance(training_metadata, dict):
            raise ValueError(f"training_metadata must be a dict, got {type(training_metadata).__name__}.")
        self.base_fingerprint: dict[str, Any] | None = dict(base_fingerprint) if base_fingerprint else None
        self.training_metadata: dict[str, Any] = dict(training_metadata or {})
        self.block_indices: list[int] | None = list(block_indices) if block_indices is not None else None
        self.num_layers: int | None = None
        self.signature_dim: int | None = None
        self.reader: nn.Module | None = None
        if (num_layers is None) != (signature_dim is None):
            raise ValueError("Give both num_layers and signature_dim (as saved by GradientDetector) or neither.")
        if num_layers is not None and signature_dim is not None:
            self._build(int(num_layers), int(signature_dim))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"gradient signatures ({self.config.layers if self.config.layers != 'all' else 'all'} blocks)"

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def _build(self, num_layers: int, signature_dim: int) -> None:
        c, f = self.config.classes, self.config.classes + 1
        self.num_layers, self.signature_dim = num_layers, signature_dim
        self.register_buffer("references", torch.zeros(c, num_layers, signature_dim))
        self.register_buffer("feature_mean", torch.zeros(num_layers, f))
        self.register_buffer("feature_std", torch.ones(num_layers, f))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            if self.config.reader == "transformer":
                self.reader = _TransformerReader(num_layers, f, c, self.config)
            else:
                self.reader = _LogisticReader(num_layers, f, c)

    @property
    def is_fitted(self) -> bool:
        return self.reader is not None and bool(self.fitted)

    # -------------------------------------------------------------------------- featurize
    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> torch.Tensor:
        """Gradient signatures ``[N, L_sel, D]`` of ``examples`` with this detector's config."""
        if self.base_fingerprint is not None:
            self.check_compatible(model)
        return gradient_signatures(model, examples, self.config)

    def _check_signatures(self, signatures: Any) -> torch.Tensor:
        if isinstance(signatures, (list, tuple)):
            signatures = torch.stack([torch.as_tensor(s) for s in signatures])
        if not isinstance(signatures, torch.Tensor) or signatures.dim() != 3:
            raise ValueError(
                f"signatures must be a [N, L, D] tensor (gradient_signatures()), got "
                f"{getattr(signatures, 'shape', type(signatures).__name__)}."
            )
        if self.num_layers is not None and tuple(signatures.shape[1:]) != (self.num_layers, self.signature_dim):
            raise ValueError(
                f"signatures have [L, D] = {list(signatures.shape[1:])} but this detector was fitted on "
                f"[{self.num_layers}, {self.signature_dim}]; compute them with the detector's GradientConfig "
                f"(layers={self.config.layers!r}, sketch={self.config.sketch!r}) on the same base model."
            )
        if not bool(torch.isfinite(signatures).all()):
            raise ValueError("signatures hold NaN/inf; recompute them with the model in float32.")
        return signatures.to(torch.float32)

    def _labels(self, labels: Any, n: int, what: str) -> torch.Tensor:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"{what} has {y.shape[0]} labels for {n} signatures.")
        bad = sorted(set(y.tolist()) - set(range(self.config.classes)))
        if bad:
            raise ValueError(
                f"{what} holds label(s) {bad}; with classes={self.config.classes} labels are "
                f"{list(range(self.config.classes))} ({', '.join(CLASS_NAMES[: self.config.classes])})."
                + (" Use abstention_labels() and classes=3 for did-not-answer." if 2 in bad else "")
            )
        return y

    # -------------------------------------------------------------------------------- fit
    def fit(  # type: ignore[override]
        self,
        signatures: torch.Tensor,
        labels: Any,
        val_signatures: torch.Tensor | None = None,
        val_labels: Any = None,
    ) -> GradientDetector:
        """Compute the class references on the training split and train the reader.

        Args:
            signatures: ``[N, L, D]`` training signatures.
            labels: ``[N]`` class labels (0 correct, 1 hallucinated, 2 did not answer if ``classes=3``).
            val_signatures: ``[M, L, D]`` validation signatures; select the reader's epoch (AUROC of
                ``P(hallucinated)``; validation cross-entropy when it holds one class only).
            val_labels: ``[M]``.

        Returns:
            ``self`` (in eval mode).

        Raises:
            ValueError: A class has no training example (the message names it), or shapes disagree.
        """
        x = self._check_signatures(signatures)
        y = self._labels(labels, x.shape[0], "labels")
        counts = torch.bincount(y, minlength=self.config.classes)
        missing = [f"{c} ({CLASS_NAMES[c]!r})" for c in range(self.config.classes) if counts[c] == 0]
        if missing:
            raise ValueError(
                f"The training split has no example of class {', '.join(missing)}, so its reference gradient cannot "
                f"be computed. Add such examples, or use classes=2"
                + (" (drop the did-not-answer class)." if self.config.classes == 3 else ".")
            )
        if self.num_layers is None or (self.num_layers, self.signature_dim) != tuple(x.shape[1:]):
            self._build(int(x.shape[1]), int(x.shape[2]))
        assert self.reader is not None
        refs = torch.stack([x[y == c].mean(0) for c in range(self.config.classes)])
        self.references.copy_(refs)
        feats = signature_features(x, refs)
        mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        feats = (feats - mean) / std
        vx = vy = None
        if val_signatures is not None:
            if val_labels is None:
                raise ValueError("val_signatures given without val_labels.")
            vs = self._check_signatures(val_signatures)
            vy = self._labels(val_labels, vs.shape[0], "val_labels")
            vx = (signature_features(vs, refs) - mean) / std
        history = self._train_reader(feats, y, counts, vx, vy)
        self.fitted.fill_(True)
        self.training_metadata["history"] = history
        self.training_metadata["train_counts"] = {CLASS_NAMES[c]: int(counts[c]) for c in range(self.config.classes)}
        return self.eval()

    def _train_reader(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        vx: torch.Tensor | None,
        vy: torch.Tensor | None,
    ) -> dict[str, Any]:
        cfg = self.config
        reader = self.reader
        assert reader is not None
        weight = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        opt = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        best_state = {k: v.detach().clone() for k, v in reader.state_dict().items()}
        best, best_epoch, stale, epochs_run = -math.inf, 0, 0, 0
        use_auroc = vy is not None and len(set((vy == 1).tolist())) == 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for epoch in range(1, cfg.epochs + 1):
                epochs_run = epoch
                reader.train()
                order = torch.randperm(x.shape[0], generator=gen)
                for start in range(0, x.shape[0], cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(reader(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                if vx is None:
                    best_epoch = epoch
                    continue
                reader.eval()
                with torch.no_grad():
                    logits = reader(vx)
                if use_auroc:
                    p1 = torch.softmax(logits, -1)[:, 1].numpy().astype(np.float64)
                    metric = _auroc((vy == 1).numpy().astype(np.int64), p1)  # type: ignore[union-attr]
                else:
                    metric = -float(nn.functional.cross_entropy(logits, vy))
                if metric > best + 1e-9:
                    best, best_epoch, stale = metric, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in reader.state_dict().items()}
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        if vx is not None:
            reader.load_state_dict(best_state)
        reader.eval()
        return {
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "selection": ("validation AUROC" if use_auroc else "validation cross-entropy")
            if vx is not None
            else "last epoch (no validation split)",
            "best_validation": None if vx is None else float(best),
        }

    # ------------------------------------------------------------------------------ score
    @torch.no_grad()
    def predict_proba(self, signatures: torch.Tensor) -> np.ndarray:
        """Class probabilities ``float64 [N, C]`` (columns: correct, hallucinated[, did not answer]).

        Raises:
            NotFittedError: Before :meth:`fit` or loading.
        """
        self.require_fitted()
        assert self.reader is not None
        x = self._check_signatures(signatures).to(self.references.device)
        feats = (signature_features(x, self.references) - self.feature_mean) / self.feature_std
        was = self.training
        self.eval()
        try:
            probs = torch.softmax(self.reader(feats), -1)
        finally:
            self.train(was)
        return probs.cpu().numpy().astype(np.float64)

    def score(self, features: torch.Tensor) -> np.ndarray:  # type: ignore[override]
        """``P(hallucinated)`` ``float64[N]`` in ``[0, 1]`` (higher = more likely hallucinated)."""
        return self.predict_proba(features)[:, 1]

    def abstention_score(self, signatures: torch.Tensor) -> np.ndarray:
        """``P(did not answer)`` ``float64[N]`` (``classes=3`` only)."""
        if self.config.classes != 3:
            raise ValueError("abstention_score() needs a detector trained with GradientConfig(classes=3).")
        return self.predict_proba(signatures)[:, 2]

    def forward(self, signatures: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, C]`` (differentiable; use :meth:`predict_proba` for inference)."""
        self.require_fitted()
        assert self.reader is not None
        feats = (signature_features(signatures, self.references) - self.feature_mean) / self.feature_std
        return self.reader(feats)

    # ---------------------------------------------------------------------- compatibility
    def set_base_model(self, model: nn.Module, base_id: str | None = None, revision: str | None = None) -> None:
        """Record ``model``'s fingerprint (checked by :meth:`check_compatible` and loading)."""
        self.base_fingerprint = model_fingerprint(model, base_id=base_id, revision=revision)
        self.block_indices = self.config.select_blocks(int(self.base_fingerprint["num_blocks"]))

    def check_compatible(self, model: nn.Module, fields: Sequence[str] = CHECKED_FIELDS) -> None:
        """Raise :class:`~hf_flowcheck.fingerprint.FingerprintMismatchError` unless ``model`` is the base model."""
        if self.base_fingerprint is None:
            raise ValueError(
                "This gradient detector has no base-model fingerprint; call detector.set_base_model(model) once you "
                "know which model its signatures came from."
            )
        check_fingerprint(self.base_fingerprint, model, fields=fields, what="gradient detector")

    # -------------------------------------------------------------------------------- I/O

    def check_saveable(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                "Fit the gradient detector before saving it (save_pretrained() of an unfitted detector)."
            )

    def config_dict(self) -> dict[str, Any]:
        """The detector's own ``config.json`` entries (``SavedDetectorMixin`` adds the stamps)."""
        return {
            "gradient_config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "signature_dim": self.signature_dim,
            "block_indices": self.block_indices,
            "base_fingerprint": jsonable(self.base_fingerprint, "base_fingerprint"),
            "training_metadata": jsonable(self.training_metadata, "training_metadata"),
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], **model_kwargs: Any) -> GradientDetector:
        keys = ("gradient_config", "num_layers", "signature_dim", "block_indices", "base_fingerprint")
        det = cls(**{k: config.get(k) for k in keys}, training_metadata=config.get("training_metadata"))
        if det.reader is None:
            raise ValueError("it has no num_layers/signature_dim (an unfitted detector)")
        return det

    def model_card_text(self) -> str:
        """Markdown of the model card (works offline)."""
        from hf_flowcheck.metrics import format_table

        fp = self.base_fingerprint or {}
        base_id = fp.get("base_id")
        lines = ["---", "library_name: hf_flowcheck", "tags:"]
        lines += [f"- {t}" for t in ("hf_flowcheck", "hallucination-detection", "gradient-signatures")]
        lines += ["---", "", f"# Gradient-signature detector{' for ' + base_id if base_id else ''}", ""]
        lines += [
            "One forward-backward pass over the prompt and the model's answer (loss: mean NLL of the answer tokens), "
            f"restricted to blocks {self.block_indices if self.block_indices is not None else self.config.layers}; "
            "per layer the cosine similarity of the gradient to each class reference and its log-norm are read by a "
            f"{self.config.reader} reader. `score` = P(hallucinated) in [0, 1]; **higher = more likely hallucinated**.",
            "",
            "## Configuration",
            "",
            "`GradientConfig("
            + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items() if k != "abstention_patterns")
            + ")`",
            "",
            "## Base model",
            "",
        ]
        lines += fingerprint_table(fp)
        lines += ["", "## Evaluation", ""]
        ev = self.training_metadata.get("evaluation")
        lines += ["```text", format_table(ev), "```"] if ev else ["No evaluation recorded."]
        cmd = self.training_metadata.get("command")
        lines += ["", "## Reproduce", ""] + (["```bash", cmd, "```"] if cmd else ["Not recorded."])
        lines += ["", f"Written by hf_flowcheck {__version__} (format version {self.FORMAT_VERSION}).", ""]
        return "\n".join(lines)
