"""The table of detectors that ``flowcheck compare`` can build by name, and how to add one.

Each entry is a factory: given the run's :class:`DetectorOptions`, it returns the detectors of that
name (one name may stand for several, e.g. ``confidence`` for four token-confidence statistics).
The CLI's ``--detectors`` choices, :func:`~hf_flowcheck.workflows.compare.compare_detectors`'s
callers and the detector contract test all read this table, so a detector registered here is
offered, compared and held to the contract without another edit.

Example:
    >>> from hf_flowcheck.detectors.baselines import AnswerLengthDetector
    >>> register_detector("my-length", lambda options: [AnswerLengthDetector()], help="answer length again")
    >>> [d.name for d in build_detectors(["my-length"], DetectorOptions())]
    ['answer length (tokens)']
    >>> unregister_detector("my-length")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hf_flowcheck.detectors.base import Detector

__all__ = [
    "DetectorOptions",
    "build_detectors",
    "register_detector",
    "registered_detectors",
    "unregister_detector",
]


@dataclass
class DetectorOptions:
    """What a factory may read when it builds its detectors for one comparison.

    Attributes:
        validator: A :class:`~hf_flowcheck.detectors.FlowValidator`, or its folder or Hub id (``flow``).
        tokenizer: The base model's tokenizer.
        protocol: The feature store's protocol (``length`` applies to ``paired`` stores only).
        seed: Seed of every stochastic detector.
        samples: Sampled answers per question (``sampling``).
        max_new_tokens: Generation budget of sampled answers.
        gradient: The gradient detector's :class:`~hf_flowcheck.detectors.gradient.GradientConfig`
            (``None``: its defaults, seeded with ``seed``).
    """

    validator: Any = None
    tokenizer: Any = None
    protocol: str = "generated"
    seed: int = 0
    samples: int = 5
    max_new_tokens: int = 32
    gradient: Any = None


Factory = Callable[[DetectorOptions], list[Detector]]
_REGISTRY: dict[str, tuple[Factory, str]] = {}


def register_detector(name: str, factory: Factory, *, help: str = "", replace: bool = False) -> None:
    """Add ``name`` to the table (``replace=True`` to redefine an existing name)."""
    if not isinstance(name, str) or not name or "," in name or name != name.strip():
        raise ValueError(f"detector name {name!r} must be a non-empty string without commas or outer spaces.")
    if not callable(factory):
        raise TypeError(f"the factory of {name!r} must be callable as factory(options) -> list of detectors.")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a detector named {name!r} is already registered; pass replace=True to redefine it.")
    _REGISTRY[name] = (factory, help)


def unregister_detector(name: str) -> None:
    """Remove ``name`` from the table (an unknown name is an error naming the known ones)."""
    _check_known([name])
    del _REGISTRY[name]


def registered_detectors() -> dict[str, str]:
    """``{name: help}`` of every registered detector, in registration order."""
    return {name: help_ for name, (_, help_) in _REGISTRY.items()}


def _check_known(names: Sequence[str]) -> None:
    bad = sorted(set(names) - set(_REGISTRY))
    if bad:
        raise ValueError(f"unknown detector(s) {bad}; choose from {', '.join(_REGISTRY)}.")


def build_detectors(names: Sequence[str], options: DetectorOptions) -> list[Detector]:
    """The detectors of ``names`` in order (each name's factory may give several, or none)."""
    _check_known(names)
    out: list[Detector] = []
    for name in names:
        built = _REGISTRY[name][0](options)
        if not isinstance(built, list) or not all(isinstance(d, Detector) for d in built):
            raise TypeError(f"the factory of detector {name!r} must return a list of Detector instances.")
        out += built
    return out


# ----------------------------------------------------------------------------------- built-ins
def _flow(options: DetectorOptions) -> list[Detector]:
    from hf_flowcheck.detectors.flow_detector import FlowValidatorDetector
    from hf_flowcheck.detectors.flow_validator import FlowValidator

    if options.validator is None:
        return []  # nothing to compare without a trained validator (the CLI says so)
    v = options.validator
    v = v if isinstance(v, FlowValidator) else FlowValidator.from_pretrained(v)
    return [FlowValidatorDetector(v, tokenizer=options.tokenizer)]


def _gradient(options: DetectorOptions) -> list[Detector]:
    from hf_flowcheck.detectors.gradient import GradientConfig, GradientDetector

    cfg = options.gradient if options.gradient is not None else GradientConfig(seed=options.seed)
    if not isinstance(cfg, GradientConfig):
        raise TypeError(f"DetectorOptions.gradient must be a GradientConfig or None, not {type(cfg).__name__}.")
    return [GradientDetector(cfg)]


def _probe(options: DetectorOptions) -> list[Detector]:
    from hf_flowcheck.detectors.baselines import HiddenStateProbe

    return [HiddenStateProbe(seed=options.seed)]


def _confidence(options: DetectorOptions) -> list[Detector]:
    from hf_flowcheck.detectors.baselines import TokenConfidenceDetector

    return [TokenConfidenceDetector(s) for s in ("mean_logprob", "min_logprob", "mean_entropy", "perplexity")]


def _sampling(options: DetectorOptions) -> list[Detector]:
    from hf_flowcheck.detectors.baselines import SamplingAgreementDetector

    return [SamplingAgreementDetector(options.samples, max_new_tokens=options.max_new_tokens, seed=options.seed)]


def _length(options: DetectorOptions) -> list[Detector]:
    from hf_flowcheck.detectors.baselines import AnswerLengthDetector

    return [AnswerLengthDetector()] if options.protocol == "paired" else []


register_detector("flow", _flow, help="the flow validator (needs --validator)")
register_detector("gradient", _gradient, help="gradient signatures with a trained reader")
register_detector("probe", _probe, help="hidden-state probe (layer chosen on validation)")
register_detector("confidence", _confidence, help="token confidence: -mean/-min log p, mean entropy, perplexity")
register_detector("sampling", _sampling, help="agreement of sampled answers")
register_detector("length", _length, help="answer length (paired stores only)")
