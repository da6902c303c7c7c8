"""`FlowCheckedModelForCausalLM`: a causal LM whose ``generate()`` can report flow scores.

It wraps (does not subclass) a transformers model, PEFT models included: unknown attributes go to
the base model, ``get_base_model()`` returns it, and with no flow flag set ``generate()`` is the base
model's ``generate()`` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_flowcheck.architectures import model_lock, unwrap_model
from hf_flowcheck.check_config import FlowCheckConfig
from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.errors import CheckpointError, NoValidatorError
from hf_flowcheck.extraction import FlowExtractor, FlowFeatures
from hf_flowcheck.generation import FlowGenerateOutput, flow_generate
from hf_flowcheck.refine_config import CONFIG_FIELDS as REFINE_CONFIG_FIELDS
from hf_flowcheck.refine_config import RefineConfig
from hf_flowcheck.refinement import FlowRefineOutput, refine
from hf_flowcheck.rollback import generate_with_rollback
from hf_flowcheck.streamer import FlowTextStreamer

__all__ = ["FlowCheckedModelForCausalLM"]


FLOW_CONFIG_NAME = "flow_config.json"
#: ``validator="bundled:<name>"`` loads a validator shipped in ``hf_flowcheck/bundled/validators``.
BUNDLED_PREFIX = "bundled:"
VALIDATOR_SUBFOLDER = "validator"
_MISSING = object()


def _load_validator(validator: Any, **hub_kwargs: Any) -> tuple[Any, FlowConfig | None]:
    """``(validator, saved flow config)``: a folder written by :meth:`FlowCheckedModelForCausalLM.save_pretrained`
    (``validator/`` and/or ``flow_config.json``) is read whole; any other folder or Hub id is a validator."""
    from hf_flowcheck.detectors.flow_validator import FlowValidator

    if validator is None or isinstance(validator, FlowValidator):
        return validator, None
    if isinstance(validator, str) and validator.startswith(BUNDLED_PREFIX):
        from hf_flowcheck.bundled import bundled_validators

        name, known = validator[len(BUNDLED_PREFIX) :], bundled_validators()
        if name not in known:
            raise ValueError(f"No bundled validator {name!r}; bundled: {', '.join(sorted(known)) or 'none'}.")
        return FlowValidator.from_pretrained(str(known[name])), None
    if isinstance(validator, (str, os.PathLike)):
        from hf_flowcheck.offline_models import local_or_hub

        folder = Path(validator).expanduser()
        saved = folder / FLOW_CONFIG_NAME
        if saved.is_file():
            try:
                config = FlowConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, ValueError, TypeError) as err:
                raise CheckpointError(
                    f"{saved} is not a valid flow config ({err}); the folder is damaged. Save it again with "
                    "FlowCheckedModelForCausalLM.save_pretrained(), or pass the validator/ subfolder alone."
                ) from None
            sub = folder / VALIDATOR_SUBFOLDER
            loaded = FlowValidator.from_pretrained(sub, **hub_kwargs) if sub.is_dir() else None
            return loaded, config
        return FlowValidator.from_pretrained(local_or_hub(validator, "validator"), **hub_kwargs), None
    raise TypeError(f"validator must be a FlowValidator, a local folder or a Hub id, got {type(validator).__name__}.")


class FlowCheckedModelForCausalLM(nn.Module):
    """A causal LM plus a flow validator.

    Args:
        model: A transformers ``*ForCausalLM`` (or a PEFT model around one).
        validator: A :class:`~hf_flowcheck.FlowValidator`, a folder, a Hub id, or ``None``.
        flow_config: How to extract signatures; defaults to the validator's, else ``FlowConfig()``.
        tokenizer: Optional; used for special tokens and the abstention message.
        check_compatibility: Check the validator's base-model fingerprint against ``model``.

    Example:
        >>> model = FlowCheckedModelForCausalLM.from_pretrained("SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=32, return_flow_scores=True)  # doctest: +SKIP
        >>> out.flow_scores  # one score per row in [0, 1], higher = more likely hallucinated  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        validator: Any = None,
        flow_config: FlowConfig | None = None,
        tokenizer: Any = None,
        check_compatibility: bool = True,
    ) -> None:
        super().__init__()
        self.base_model = model
        validator, saved_config = _load_validator(validator)
        if validator is not None and check_compatibility:
            validator.check_compatible(model)  # a validator without a fingerprint is refused, not trusted
        self.validator = validator
        if flow_config is None:
            flow_config = getattr(validator, "flow_config", None) or saved_config or FlowConfig()
        elif (
            validator is not None
            and validator.flow_config is not None
            and not validator.flow_config.same_features(flow_config)
        ):
            raise ValueError(
                f"flow_config {flow_config} differs from the one the validator was trained with "
                f"({validator.flow_config}); its scores would be meaningless. Leave flow_config=None, or change "
                "only basis_solver (dataclasses.replace(validator.flow_config, basis_solver='subspace'))."
            )
        self.tokenizer = tokenizer
        self.extractor = FlowExtractor(model, flow_config, tokenizer=tokenizer)
        # The extractor owns the flow config; `flow_config` reads it.
        self._model_lock = model_lock(model)
        if validator is not None:
            validator.to(self.extractor.arch.readout.device).eval()

    @property
    def flow_config(self) -> FlowConfig:
        """The extraction settings (owned by :attr:`extractor`; read-only)."""
        return self.extractor.config

    # --------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str],
        validator: Any = _MISSING,
        flow_config: FlowConfig | None = None,
        *,
        load_tokenizer: bool = True,
        **from_pretrained_kwargs: Any,
    ) -> FlowCheckedModelForCausalLM:
        """Load a base model (offline name, folder or Hub id) and its validator.

        Args:
            base: ``"SmolLM2-135M-Instruct"`` (offline registry), a local folder, or a Hub id.
            validator: A :class:`FlowValidator`, folder, Hub id or ``"bundled:<name>"`` (a validator
                shipped with the package, e.g. the streaming one). Left out: the bundled default
                validator for this base model if there is one (else none). ``None``: no validator.
            flow_config: Extraction settings (default: the validator's).
            load_tokenizer: Also load the tokenizer (kept as ``.tokenizer``).
            **from_pretrained_kwargs: For ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
                ``device_map``, ``revision``, ...).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_flowcheck.offline_models import resolve_model

        path = resolve_model(base)
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs).eval()
        tokenizer = None
        if load_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                tokenizer = None
        if validator is _MISSING:
            from hf_flowcheck.bundled import default_validator_for

            validator = default_validator_for(model, name=os.fspath(base))
        return cls(model, validator, flow_config, tokenizer=tokenizer)

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, overwrite: bool = False, **kwargs: Any
    ) -> None:
        """Save the validator (``validator/``) and the flow config — not the base weights.

        ``FlowCheckedModelForCausalLM.from_pretrained(base, validator=save_directory)`` reads both back.
        A folder that holds anything else (the base model's own files, say) is refused; ``overwrite=True``
        replaces another hf_flowcheck artifact but never a file hf_flowcheck did not write.
        """
        from hf_flowcheck.detectors.checkpoint import atomic_save_dir

        def write(tmp: Path) -> None:
            (tmp / FLOW_CONFIG_NAME).write_text(json.dumps(self.flow_config.to_dict(), indent=2, sort_keys=True))
            if self.validator is not None:
                self.validator.save_pretrained(tmp / VALIDATOR_SUBFOLDER, **kwargs)

        # All or nothing: a failure leaves an existing folder as it was.
        atomic_save_dir(save_directory, write, required=FLOW_CONFIG_NAME, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push the validator (with its flow config and model card) to the Hub."""
        if self.validator is None:
            raise NoValidatorError("There is no validator to push; train one first (flowcheck train).")
        return self.validator.push_to_hub(repo_id, **kwargs)

    # ------------------------------------------------------------------------- delegation
    def get_base_model(self) -> nn.Module:
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    # --------------------------------------------------------------------------- generate
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``generate()`` of the base model, plus flow scores when asked.

        Args:
            input_ids: ``[batch, prompt]`` (left padding for batches).
            return_flow_scores: Return a :class:`FlowGenerateOutput` with ``flow_scores``,
                ``flow_event_scores``, ``flow_culprits``. Also read from ``generation_config``.
            return_flow_features: Also return the :class:`FlowFeatures`.
            flow_check_every: Score every row every this many tokens while generating.
            flow_check_refit: When a streaming check refits the window bases: ``"always"`` (default;
                every running score is the spec's score of the answer so far) or ``"doubling"``
                (refit once the answer has doubled in length since the last fit, reuse the last
                bases in between: an approximation of the running score, far cheaper; the final
                score is exact either way). Per-token work (lens channels, JVPs) is never repeated.
            flow_abstain_threshold: With ``flow_check_every``: a row whose running score exceeds
                this stops and ends with ``flow_abstain_message``. ``"recommended"`` takes the
                validator's threshold chosen on validation (precision 0.8, see its model card).
            flow_abstain_message: Default ``"I am not sure."``.
            flow_rollback_threshold: With ``flow_check_every``: a row whose running score exceeds
                this is stopped there, rolled back to its culprit and regenerated under the block
                clamp (``refine``) within this call; a number in ``[0, 1]`` or ``"recommended"``.
            flow_max_rollbacks: Rollback candidates per row (the top culprit tokens; the refined
                answer the validator scores lowest is kept). Default 1.
            streamer: A :class:`~hf_flowcheck.FlowTextStreamer` streams text with running scores
                and per-token risks (batch of one; checks every token unless ``flow_check_every``
                says otherwise); any other transformers streamer works as with plain ``generate``.
            **kwargs: Everything ``transformers`` ``generate()`` takes.

        Returns:
            The base ``generate()`` result when no flow flag is set; else a :class:`FlowGenerateOutput`.
        """
        check = FlowCheckConfig.from_generate_kwargs(kwargs)
        flow_streamer = isinstance(kwargs.get("streamer"), FlowTextStreamer)
        if check.check_refit is not None and not check.check_every and not flow_streamer:
            raise ValueError(
                "flow_check_refit needs flow_check_every (it says how streaming checks refit); pass "
                "flow_check_every=1 or a larger integer, or drop flow_check_refit."
            )
        if flow_streamer:
            check = check.with_stream()  # a flow streamer needs running scores: check every token
        # One call at a time per base model, plain ones included: another thread's forward passes would
        # otherwise run through this call's capture hooks (architectures.model_lock).
        with self._model_lock:
            if not check.wants_flow:
                if input_ids is not None:
                    kwargs["input_ids"] = input_ids
                return self.base_model.generate(**kwargs)
            return self._flow_generate(input_ids, kwargs, check)

    def _flow_generate(
        self, input_ids: torch.Tensor | None, kwargs: dict[str, Any], check: FlowCheckConfig
    ) -> FlowGenerateOutput:
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("Flow-checked generate() needs input_ids (inputs_embeds are not supported).")
        if (check.return_flow_scores or check.check_every) and self.validator is None:
            raise NoValidatorError(
                "return_flow_scores=True (or a streaming check) needs a validator: pass validator='org/name' "
                "or a folder to FlowCheckedModelForCausalLM.from_pretrained, train one with `flowcheck train`, "
                "or ask only for return_flow_features=True to get the raw signatures."
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(
                f"input_ids must be a [batch, prompt] LongTensor, got {shape}; for one prompt use "
                "input_ids.unsqueeze(0) or tokenizer(text, return_tensors='pt')."
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass the tokenizer's ids "
                "(tokenizer(text, return_tensors='pt')) or convert with input_ids.long()."
            )
        if input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has an empty prompt (shape {tuple(input_ids.shape)}): flow-checked generation scores "
                "an answer to a prompt; pass at least one prompt token (the chat template's or the BOS token)."
            )
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = self._infer_attention_mask(input_ids, kwargs)
        elif tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
                "pass the mask the tokenizer returned with these ids."
            )
        empty = (~attention_mask.bool().any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"attention_mask masks every token of row(s) {empty}: those rows have no prompt, so their answer "
                "and its flow score would mean nothing. Drop the rows, or pass the mask the tokenizer returned."
            )
        n_return = kwargs.pop("num_return_sequences", None)
        if n_return is not None and n_return != 1:
            if isinstance(n_return, bool) or not isinstance(n_return, int) or n_return < 1:
                raise ValueError(f"num_return_sequences={n_return!r} must be a positive integer.")
            if not kwargs.get("do_sample", False) and int(kwargs.get("num_beams", 1) or 1) == 1:
                raise ValueError(
                    f"num_return_sequences={n_return} with greedy decoding would return {n_return} identical rows; "
                    "pass do_sample=True (as plain generate() requires)."
                )
            # What generate() does inside: each prompt repeated, rows of one prompt adjacent.
            input_ids = input_ids.repeat_interleave(n_return, dim=0)
            attention_mask = attention_mask.repeat_interleave(n_return, dim=0)
        self._check_context(input_ids, kwargs)
        _, _, eos = self._abstention(check, with_threshold=False)
        if check.rollback_threshold is not None:
            if isinstance(kwargs.get("streamer"), FlowTextStreamer):
                raise ValueError(
                    "flow_rollback_threshold cannot be combined with a FlowTextStreamer: text already streamed "
                    "cannot be taken back. Stream with flow_abstain_threshold, or roll back without a streamer."
                )
            if eos is None:
                raise ValueError("Rollback needs an end-of-sequence token id (set generation_config.eos_token_id).")
            threshold = self._threshold("flow_rollback_threshold", check.rollback_threshold)
            return generate_with_rollback(
                self.base_model, self.extractor, self.validator, input_ids, attention_mask, check, threshold, eos,
                tokenizer=self.tokenizer, **kwargs,
            )  # fmt: skip
        threshold, abstain_ids, eos = self._abstention(check) if check.check_every else (None, None, None)
        return flow_generate(
            self.extractor,
            self.validator,
            input_ids,
            attention_mask,
            scores=check.return_flow_scores,
            features=check.return_flow_features,
            check_every=check.check_every,
            abstain_threshold=threshold,
            abstain_ids=abstain_ids,
            abstain_eos_id=eos,
            check_refit=check.check_refit or "always",
            **kwargs,
        )

    def _threshold(self, name: str, value: Any) -> float:
        """A threshold from the checked config: a number in ``[0, 1]``, or ``"recommended"`` resolved here."""
        if value == "recommended":
            return self.validator.recommended_threshold()
        return float(value)

    def _infer_attention_mask(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The mask plain ``generate()`` infers: pad tokens masked when the pad id is not the EOS id."""
        gen_cfg = kwargs.get("generation_config") or getattr(unwrap_model(self.base_model), "generation_config", None)
        pad = kwargs.get("pad_token_id", getattr(gen_cfg, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(gen_cfg, "eos_token_id", None))
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

    def score(self, features: FlowFeatures) -> Any:
        """Run the validator on features (e.g. from ``self.extractor.extract``)."""
        if self.validator is None:
            raise NoValidatorError("No validator loaded; pass validator=... to from_pretrained.")
        return self.validator.score_features(features)

    def refine(self, output: FlowGenerateOutput, config: RefineConfig | None = None, **kwargs: Any) -> FlowRefineOutput:
        """Roll flagged answers back to their culprit and regenerate them under the block clamp.

        A one-line delegate to :func:`hf_flowcheck.refinement.refine` (spec §7) with this model's
        base model, extractor, validator and tokenizer.

        Args:
            output: From ``self.generate(..., return_flow_scores=True)``.
            config: A :class:`~hf_flowcheck.RefineConfig`; its fields (``strategy``, ``alpha``,
                ``threshold``, ``seed``...) may also be given as keyword arguments, which override it.
            **kwargs: ``rows``, ``attention_mask`` and generate settings, as :func:`~hf_flowcheck.refine` takes.

        Returns:
            A :class:`~hf_flowcheck.FlowRefineOutput` with ``sequences`` for every row of the batch.
        """
        overrides = {name: kwargs.pop(name) for name in REFINE_CONFIG_FIELDS if name in kwargs}
        config = dataclasses.replace(config or RefineConfig(), **overrides)
        return refine(
            self.base_model, self.extractor, self.validator, output, config, tokenizer=self.tokenizer, **kwargs
        )

    def _abstention(
        self, check: FlowCheckConfig, *, with_threshold: bool = True
    ) -> tuple[float | None, list[int], int | None]:
        """``(threshold, message ids, eos id)`` of a streaming check (``with_threshold=False``: no threshold)."""
        threshold = check.abstain_threshold if with_threshold else None
        if threshold is not None:
            threshold = self._threshold("flow_abstain_threshold", threshold)
        message = check.abstain_message if check.abstain_message is not None else "I am not sure."
        ids: list[int] = []
        if threshold is not None:
            if self.tokenizer is None:
                raise ValueError("Abstention needs the tokenizer (to write the abstention message); pass tokenizer=.")
            ids = self.tokenizer(" " + message.strip(), add_special_tokens=False).input_ids
        gen_cfg = getattr(unwrap_model(self.base_model), "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return threshold, ids, eos

    def _check_context(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
        cfg = getattr(unwrap_model(self.base_model), "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        max_new = kwargs.get("max_new_tokens")
        if max_new is None:
            gen_cfg = kwargs.get("generation_config") or getattr(
                unwrap_model(self.base_model), "generation_config", None
            )
            max_new = getattr(gen_cfg, "max_new_tokens", None) or 0
        if limit and input_ids.shape[1] + int(max_new) > limit:
            raise ValueError(
                f"The prompt has {input_ids.shape[1]} tokens and max_new_tokens={max_new}, more than the "
                f"model's context of {limit} positions. Truncate the prompt (tokenizer(..., truncation=True, "
                f"max_length={max(1, limit - int(max_new))})) or lower max_new_tokens."
            )
