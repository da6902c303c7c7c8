"""Training the flow validator (spec ``flow-signatures.md`` §6, paper B.10, with its corrections).

* The **validation** split chooses the checkpoint and drives early stopping (validation AUROC);
  the test split is never seen here.
* Positive-class weight = negatives / positives on the train split (1.0 when a class is absent).
* AdamW (weight decay 1e-2), ``BCEWithLogitsLoss``, gradient clipping at norm 1.0.
* Seeded: the same seed and data give bit-identical weights on the same machine. Each epoch
  reseeds dropout and the shuffle from ``(seed, epoch)`` inside ``torch.random.fork_rng`` (the
  caller's RNG state is left untouched), so a resumed run equals an uninterrupted one.
* Resumable: with ``checkpoint_dir``, ``train_state.safetensors`` (current and best weights and the
  AdamW moments as tensors, the rest as JSON in its metadata) and a readable
  ``train_state.json`` copy are replaced atomically after each epoch; no pickles.

Example:
    >>> import torch
    >>> from hf_flowcheck.extraction import FlowFeatures
    >>> def split(n):
    ...     y = torch.arange(n) % 2
    ...     x = torch.randn(n, 2, 3, 4) + 2.0 * y[:, None, None, None]
    ...     return FlowFeatures(x, torch.ones(n, 2, 3, dtype=torch.bool), torch.arange(3).repeat(n, 1),
    ...                         ("a", "b", "c", "d")), y
    >>> (tr, ytr), (va, yva) = split(32), split(16)
    >>> cfg = ValidatorConfig(num_features=4, hidden=16, embed=8, gru_hidden=8)
    >>> validator, history = train_validator(tr, ytr, va, yva, config=cfg, epochs=3, progress=False)
    >>> len(history.val_auroc)
    3
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.detectors.baselines import train_logistic_regression
from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.fingerprint import model_fingerprint
from hf_flowcheck.metrics import auroc
from hf_flowcheck.version import __version__
from hf_flowcheck.workflows.train_config import TrainConfig

__all__ = ["STATE_JSON", "STATE_NAME", "TrainingHistory", "train_validator"]

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_FORMAT_VERSION = 1
_SEED_MULT = 1_000_003


@dataclass
class TrainingHistory:
    """What happened during :func:`train_validator`.

    Attributes:
        train_loss: Mean weighted BCE per epoch (all epochs run, resumed ones included).
        val_auroc: Validation AUROC per epoch.
        val_loss: Validation BCE per epoch (same class weight as training).
        best_epoch: 1-based epoch whose weights were kept (-1 if none ran).
        best_val_auroc: Validation AUROC of the kept weights.
        best_val_loss: Validation BCE of the kept weights.
        selection: What picked ``best_epoch``: ``"val_loss"`` or ``"val_auroc"``.
        epochs_run: Epochs completed in total.
        stopped_early: Whether ``patience`` epochs without improvement ended training.
        pos_weight: Positive-class weight used (negatives / positives on train).
        skipped_train: Train rows without any valid event (left out).
        skipped_val: Validation rows without any valid event (left out of the AUROC).
        resumed_from_epoch: Completed epochs found in ``checkpoint_dir`` (``None`` = fresh run).
    """

    train_loss: list[float] = field(default_factory=list)
    val_auroc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_val_auroc: float = float("nan")
    best_val_loss: float = float("nan")
    selection: str = "val_loss"
    epochs_run: int = 0
    stopped_early: bool = False
    pos_weight: float = 1.0
    skipped_train: int = 0
    skipped_val: int = 0
    resumed_from_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN as ``None``)."""
        out = dataclasses.asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _labels(labels: Any, n: int, name: str) -> torch.Tensor:
    try:
        arr = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of 0/1 labels (1 = hallucinated): {err}") from err
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{name} has shape {arr.shape} but its features hold {n} samples; give one 0/1 label per sample."
        )
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        vals = sorted({str(v) for v in arr[bad][:5]})
        raise ValueError(
            f"{name} must hold only 0 and 1 (1 = hallucinated); found {vals}. Map your labels to 0/1 first "
            "(e.g. threshold a judge's score, drop undecided items)."
        )
    return torch.from_numpy(arr.astype(np.float32))


def _check_split(features: Any, labels: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(labels [N] float, has_events [N] bool)``."""
    if not isinstance(features, FlowFeatures):
        raise ValueError(f"{name} must be FlowFeatures (from FlowExtractor), got {type(features).__name__}.")
    n = len(features)
    if n == 0:
        raise ValueError(f"The {name} split is empty (0 samples); build non-empty train and validation splits.")
    y = _labels(labels, n, f"{name}_labels")
    has = features.valid.reshape(n, -1).any(1).cpu()
    return y, has


# ---------------------------------------------------------------------------------------------
# Checkpoint state
# ---------------------------------------------------------------------------------------------


def _data_key(features: FlowFeatures, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(features.values.shape)).encode())
    h.update(features.valid.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(f"{float(features.values.detach().double().sum()):.6e}".encode())
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_state(
    directory: Path,
    model: nn.Module,
    best_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
    for k, v in (best_state or {}).items():
        tensors[f"best.{k}"] = v.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    state_keys: dict[str, list[str]] = {}
    for pid, st in opt["state"].items():
        keys = []
        for key, val in st.items():
            if not isinstance(val, torch.Tensor):
                val = torch.tensor(val)
            tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous().clone()
            keys.append(key)
        state_keys[str(pid)] = keys
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    info = {**info, "optimizer": {"param_groups": groups, "state_keys": state_keys}}
    text = json.dumps(info, sort_keys=True, indent=2)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / STATE_NAME, lambda p: save_file(tensors, str(p), metadata={"train_state": text}))
    _atomic_write(directory / STATE_JSON, lambda p: p.write_text(text, encoding="utf-8"))


def _load_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = directory / STATE_NAME
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        info = json.loads(meta["train_state"])
    except Exception as err:
        raise ValueError(
            f"Cannot resume from {path}: {err}. The training state is corrupted or was not written by "
            "train_validator; delete it (and train_state.json) or use another checkpoint_dir."
        ) from err
    if info.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer hf_flowcheck (state format {info.get('format_version')}); upgrade."
        )
    return info, tensors


def _optimizer_state(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    groups = []
    for g in info["optimizer"]["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    state = {
        int(pid): {key: tensors[f"optim.{pid}.{key}"] for key in keys}
        for pid, keys in info["optimizer"]["state_keys"].items()
    }
    return {"state": state, "param_groups": groups}


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _rows(states: torch.Tensor | None, idx: Any, dev: torch.device) -> torch.Tensor | None:
    return None if states is None else states[idx].to(dev)


@torch.no_grad()
def _scores(
    model: FlowValidator,
    values: torch.Tensor,
    valid: torch.Tensor,
    states: torch.Tensor | None,
    batch: int,
    dev: torch.device,
) -> np.ndarray:
    model.eval()
    out = [
        model(values[i : i + batch].to(dev), valid[i : i + batch].to(dev), _rows(states, slice(i, i + batch), dev))
        .logits.float()
        .cpu()
        for i in range(0, values.shape[0], batch)
    ]
    return torch.cat(out).numpy().astype(np.float64)


def _weighted_bce(logits: np.ndarray, y: np.ndarray, pos_weight: float) -> float:
    """Mean BCE with the training class weight (what the validation loss selects on)."""
    lt = torch.from_numpy(logits)
    yt = torch.from_numpy(y.astype(np.float64))
    return float(nn.functional.binary_cross_entropy_with_logits(lt, yt, pos_weight=torch.tensor(pos_weight)))


def _random_prefixes(valid: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """``[n, B, T]`` masks with each row cut, with probability ``p``, to its first ``1..T_i-1`` tokens."""
    n_tok = valid.any(1).sum(-1)  # [n] tokens per answer (columns are in token order)
    cut = torch.rand(len(valid), generator=gen) < p
    keep = (torch.rand(len(valid), generator=gen) * (n_tok - 1).clamp_min(0)).long() + 1  # 1..T_i-1
    keep = torch.where(cut & (n_tok > 1), keep, n_tok)
    cols = torch.arange(valid.shape[-1])
    return valid & (cols[None, None, :] < keep[:, None, None])


def _warm_start_from_probe(
    model: FlowValidator, states: torch.Tensor, labels: torch.Tensor, pos_weight: float, l2: float
) -> None:
    """Set the state branch to the L2 logistic regression on its (standardised) inputs; zero the event head."""
    cfg = model.config
    sel = states[:, list(cfg.state_blocks)].to(model.state_shift)
    z = ((sel - model.state_shift) / model.state_scale).reshape(len(sel), -1)
    w, b = train_logistic_regression(z.cpu(), labels.cpu(), l2=l2)
    with torch.no_grad():
        model.state_head.weight.copy_(w.to(model.state_head.weight)[None])
        # The weighted BCE's optimum sits log(pos_weight) above the unweighted probe's logit.
        model.state_head.bias.fill_(float(b) + math.log(pos_weight))
        # The flow part's last layer at zero: the depth head's block logits, the other heads' event logits.
        flow_out = model.depth_out if model.config.head == "depth" else model.head
        flow_out.weight.zero_()
        flow_out.bias.zero_()


def _with_probe_states(s_tr: torch.Tensor, y_tr: torch.Tensor, probe_states: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The train rows' states and labels followed by ``probe_states``' (checked)."""
    if not isinstance(probe_states, (tuple, list)) or len(probe_states) != 2:
        raise ValueError("probe_states must be a pair (states [M, B+1, d], labels [M]).")
    states, labels = probe_states
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or tuple(states.shape[1:]) != tuple(s_tr.shape[1:]):
        raise ValueError(
            f"probe_states' states must be [M, {s_tr.shape[1]}, {s_tr.shape[2]}] like the train features' states, "
            f"got {list(getattr(states, 'shape', [type(states).__name__]))}."
        )
    y = torch.as_tensor(np.asarray(labels), dtype=y_tr.dtype).reshape(-1)
    if y.numel() != states.shape[0] or not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"probe_states' labels must be {states.shape[0]} values of 0 or 1.")
    if not bool(torch.isfinite(states).all()):
        raise ValueError("probe_states' states hold NaN/inf; extract them in float32 from the same base model.")
    return torch.cat([s_tr, states.to(s_tr)]), torch.cat([y_tr, y])


def train_validator(
    train: FlowFeatures,
    train_labels: Any,
    val: FlowFeatures,
    val_labels: Any,
    *,
    config: ValidatorConfig | None = None,
    train_config: TrainConfig | None = None,
    token_labels: torch.Tensor | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    flow_config: FlowConfig | None = None,
    base_model: nn.Module | None = None,
    probe_states: tuple[torch.Tensor, Any] | None = None,
    **options: Any,
) -> tuple[FlowValidator, TrainingHistory]:
    """Train a :class:`~hf_flowcheck.detectors.FlowValidator` with validation-AUROC model selection.

    Args:
        train: Train features, ``values [N, B, T, F]``, ``valid [N, B, T]``.
        train_labels: ``[N]`` 0/1 labels (1 = hallucinated).
        val: Validation features (same ``F`` and names); picks the checkpoint, drives early stopping.
        val_labels: ``[N_val]`` 0/1 labels; both classes must be present.
        config: Network shape; default ``ValidatorConfig.from_feature_names(train.names)``.
        train_config: The optimisation recipe (:class:`~hf_flowcheck.workflows.train_config.TrainConfig`;
            its defaults when omitted). This function reads ``lr``, ``epochs``, ``batch_size``,
            ``weight_decay``, ``grad_clip``, ``patience``, ``selection`` (``"val_loss"``: the weighted
            validation BCE, smooth even on small validation sets; or ``"val_auroc"``; it picks the kept
            epoch and drives early stopping), ``state_init``, ``state_l2``, ``prefix_augment``,
            ``token_loss_weight`` and ``seed``; the network's shape is ``config``'s.
            ``state_init="probe"`` starts the state branch (flow + state validators) at an L2 logistic
            regression on the training states -- the hidden-state probe -- with the event head at zero,
            and the initialisation is a selection candidate (``best_epoch == 0``), so on validation the
            result is never worse than the probe; ``"frozen-probe"`` keeps the state branch there and
            trains the flow part as a residual on top. ``prefix_augment`` is the probability that a
            training answer is cut, in a batch, to a random prefix of its tokens (flow-only validators;
            validation uses whole answers), so that a streaming check's running score means something
            before the answer ends.
        token_labels: ``[N, T]`` weak token labels of the train rows (1 / 0, ``nan`` = no label; e.g.
            :func:`~hf_flowcheck.workflows.token_labels.reference_token_labels`). With
            ``token_loss_weight > 0`` the loss adds that weight times the mean BCE of the validator's
            token logits against them, so per-token risks learn a token-level target.
            Selection still uses the answer-level validation loss (or AUROC).
        checkpoint_dir: Folder for the resumable training state (and ``best/``, the kept
            validator via ``save_pretrained``). An existing state there is resumed; a finished
            (or early-stopped) run returns its best validator at once.
        progress: Show a tqdm bar over epochs.
        flow_config: The ``FlowConfig`` the features were computed with (stored in the validator).
        base_model: The model the features came from; its fingerprint is stored (see
            :meth:`FlowValidator.check_compatible`).
        probe_states: ``(states [M, B+1, d], labels [M])`` of more training answers that only the
            state branch sees: its input scaling and its probe (``state_init`` ``"probe"`` or
            ``"frozen-probe"``) are fitted on the train rows' states and these together. For answers
            whose state summaries are cheap to extract and whose flow features are not (a pooled
            residual needs one forward; the flow features a replay). Keep validation answers out.
        **options: :class:`TrainConfig` fields that override ``train_config``'s (e.g. ``epochs=5``;
            ``device="cuda"``: where to train, default the device of ``train.values``).

    Returns:
        ``(validator, history)``; the validator holds the weights of the best epoch by ``selection``, in
        eval mode.

    Raises:
        ValueError: Empty splits, labels other than 0/1, mismatched features, a validation split
            with one class only, bad hyperparameters, or a checkpoint from a different run.
    """
    y_tr, has_tr = _check_split(train, train_labels, "train")
    y_va, has_va = _check_split(val, val_labels, "val")
    if tuple(train.names) != tuple(val.names) or train.values.shape[-1] != val.values.shape[-1]:
        raise ValueError(
            f"train and val features differ: {list(train.names)} vs {list(val.names)}; extract both splits with "
            "the same FlowConfig."
        )
    recipe = TrainConfig.with_options(train_config, options)
    lr, epochs, batch_size, patience = recipe.lr, recipe.epochs, recipe.batch_size, recipe.patience
    weight_decay, grad_clip, selection, seed = recipe.weight_decay, recipe.grad_clip, recipe.selection, recipe.seed
    state_init, state_l2, prefix_augment = recipe.state_init, recipe.state_l2, recipe.prefix_augment
    token_loss_weight = recipe.token_loss_weight
    if prefix_augment and config is not None and getattr(config, "state_dim", 0):
        raise ValueError(
            "prefix_augment trains on answer prefixes, but this config has a state branch, which reads the residual at "
            "the last token of the whole answer (a prefix has no such state in the store). Train a flow-only (or "
            "flow + lens) validator for streaming: drop --state, or set prefix_augment=0."
        )
    if token_loss_weight and token_labels is None:
        raise ValueError("token_loss_weight > 0 needs token_labels ([N, T] per train row); give both or neither.")
    if token_labels is not None:
        token_labels = torch.as_tensor(token_labels, dtype=torch.float32)
        if tuple(token_labels.shape) != tuple(train.positions.shape):
            raise ValueError(
                f"token_labels has shape {tuple(token_labels.shape)} but the train features have "
                f"{tuple(train.positions.shape)} (rows, token columns); label the same rows and columns."
            )
    if state_init != "random" and (config is None or not getattr(config, "state_dim", 0)):
        raise ValueError(
            f"state_init={state_init!r} starts the state branch at the hidden-state probe, but config has no state "
            "branch; give a ValidatorConfig with state_dim and state_blocks (flowcheck train --state) or use 'random'."
        )
    if state_init != "random" and getattr(config, "members", 1) > 1:
        raise ValueError(
            f"state_init={state_init!r} starts one state branch at the hidden-state probe; an ensemble "
            f"(members={config.members}) has one per member. Use state_init='random' or members=1."
        )
    if config is not None and getattr(config, "state_dim", 0) and (train.states is None or val.states is None):
        raise ValueError(
            "config has a state branch (state_dim > 0) but the features carry no state summaries; extract them "
            "with FlowConfig(state_summary='last') or train a flow-only validator (state_dim=0)."
        )
    if probe_states is not None and state_init == "random":
        raise ValueError(
            "probe_states adds answers to the state branch's probe, but state_init='random' fits no probe; "
            "use state_init='probe' or 'frozen-probe', or drop probe_states."
        )
    if config is None:
        config = ValidatorConfig.from_feature_names(train.names)
    if not isinstance(config, ValidatorConfig):
        raise ValueError(f"config must be a ValidatorConfig, got {type(config).__name__}.")
    if config.num_features != train.values.shape[-1]:
        raise ValueError(
            f"config.num_features={config.num_features} but the features have F={train.values.shape[-1]}; "
            "use ValidatorConfig.from_feature_names(train.names)."
        )

    skipped_train, skipped_val = int((~has_tr).sum()), int((~has_va).sum())
    if skipped_train or skipped_val:
        logger.warning(
            "train_validator: skipping %d train and %d validation rows without any valid event.",
            skipped_train,
            skipped_val,
        )
    tr_idx, va_idx = has_tr.nonzero().squeeze(1), has_va.nonzero().squeeze(1)
    if tr_idx.numel() == 0:
        raise ValueError("No train sample has a valid event (all token masks are empty); check the response masks.")
    if va_idx.numel() == 0:
        raise ValueError(
            "No validation sample has a valid event (all token masks are empty); check the response masks."
        )
    x_tr, m_tr, y_tr = train.values[tr_idx], train.valid[tr_idx], y_tr[tr_idx]
    t_tr = token_labels[tr_idx] if token_loss_weight else None
    x_va, m_va, y_va = val.values[va_idx], val.valid[va_idx], y_va[va_idx]
    with_states = bool(config.state_dim)
    s_tr = train.states[tr_idx] if with_states else None
    s_va = val.states[va_idx] if with_states else None
    s_fit, y_fit = s_tr, y_tr  # what the state scaling and the probe are fitted on
    if probe_states is not None:
        s_fit, y_fit = _with_probe_states(s_tr, y_tr, probe_states)
    n_pos_va = int(y_va.sum())
    if n_pos_va in (0, y_va.numel()):
        raise ValueError(
            f"The validation split has only class {int(y_va[0])} ({y_va.numel()} samples with events); validation "
            "AUROC, which selects the checkpoint, needs both classes. Re-split (grouped, seeded) so both appear."
        )
    n_pos, n_neg = int(y_tr.sum()), int(y_tr.numel() - y_tr.sum())
    pos_weight = n_neg / n_pos if n_pos > 0 and n_neg > 0 else 1.0
    if n_pos == 0 or n_neg == 0:
        logger.warning("train_validator: the train split has only one class (%d pos, %d neg).", n_pos, n_neg)

    dev = torch.device(recipe.device) if recipe.device is not None else train.values.device
    fingerprint = model_fingerprint(base_model) if base_model is not None else None
    hyper = {
        "lr": float(lr),
        "batch_size": int(batch_size),
        "weight_decay": float(weight_decay),
        "grad_clip": None if grad_clip is None else float(grad_clip),
        "patience": int(patience),
        "selection": selection,
        "seed": int(seed),
    }
    if state_init != "random":  # absent at the defaults, so earlier checkpoints still resume
        hyper.update(state_init=state_init, state_l2=float(state_l2))
    if probe_states is not None:
        extra = s_fit[len(s_tr) :]
        hyper.update(probe_states=f"{len(extra)} answers, state sum {float(extra.double().sum()):.6e}")
    if prefix_augment:
        hyper.update(prefix_augment=float(prefix_augment))
    if token_loss_weight:
        labels_key = hashlib.sha256(token_labels.nan_to_num(-1.0).numpy().tobytes()).hexdigest()
        hyper.update(token_loss_weight=float(token_loss_weight), token_labels=labels_key)
    run_key = {
        **hyper,
        "validator_config": config.to_dict(),
        "pos_weight": pos_weight,
        "train_data": _data_key(train, _labels(train_labels, len(train), "train_labels")),
        "val_data": _data_key(val, _labels(val_labels, len(val), "val_labels")),
    }
    run_key["validator_config"].pop("hf_flowcheck_version", None)

    history = TrainingHistory(
        pos_weight=pos_weight, skipped_train=skipped_train, skipped_val=skipped_val, selection=selection
    )
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = FlowValidator(config, flow_config=flow_config, base_fingerprint=fingerprint).to(dev)
        model.fit_input_transform(x_tr, m_tr, s_tr)
        if probe_states is not None:
            model.fit_state_transform(s_fit)
        if state_init != "random":
            _warm_start_from_probe(model, s_fit, y_fit, pos_weight, state_l2)
        if state_init == "frozen-probe":
            model.state_head.requires_grad_(False)
        trainable = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=dev))
        best_state: dict[str, torch.Tensor] | None = None
        start, bad_epochs = 0, 0
        if ckpt is not None and (ckpt / STATE_NAME).exists():
            info, tensors = _load_state(ckpt)
            diff = sorted(k for k in run_key if info.get("run", {}).get(k) != run_key[k])
            if diff:
                raise ValueError(
                    f"{ckpt / STATE_NAME} belongs to a different training run ({', '.join(diff)} differ); resume "
                    "with the same data and settings (only epochs may change), or use a fresh checkpoint_dir."
                )
            model.load_state_dict(_prefixed(tensors, "model."))
            best = _prefixed(tensors, "best.")
            best_state = {k: v.to(dev) for k, v in best.items()} if best else None
            optimizer.load_state_dict(_optimizer_state(info, tensors))
            start, bad_epochs = int(info["epoch"]), int(info["bad_epochs"])
            history.train_loss, history.val_auroc = list(info["train_loss"]), list(info["val_auroc"])
            history.val_loss = list(info.get("val_loss", []))
            history.best_epoch = int(info["best_epoch"])
            history.best_val_auroc = float("nan") if info["best_val_auroc"] is None else float(info["best_val_auroc"])
            best_loss = info.get("best_val_loss")
            history.best_val_loss = float("nan") if best_loss is None else float(best_loss)
            history.stopped_early = bool(info["stopped_early"])
            history.resumed_from_epoch = start
        history.epochs_run = start
        if state_init != "random" and start == 0:
            # The probe itself is the first candidate: training must beat it on validation to be kept.
            val_logits = _scores(model, x_va, m_va, s_va, max(batch_size, 256), dev)
            history.best_epoch, history.best_val_auroc = 0, auroc(y_va.numpy(), val_logits)
            history.best_val_loss = _weighted_bce(val_logits, y_va.numpy(), pos_weight)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        bar = tqdm(total=epochs, initial=min(start, epochs), disable=not progress, desc="train FlowValidator")
        try:
            epoch = start
            while epoch < epochs and not history.stopped_early:
                torch.manual_seed((seed * _SEED_MULT + epoch) % (2**63 - 1))
                gen = torch.Generator().manual_seed((seed * _SEED_MULT + epoch + 7919) % (2**63 - 1))
                perm = torch.randperm(x_tr.shape[0], generator=gen)
                model.train()
                total, count = 0.0, 0
                for i in range(0, perm.numel(), batch_size):
                    idx = perm[i : i + batch_size]
                    mask = m_tr[idx]
                    if prefix_augment:
                        mask = _random_prefixes(mask, prefix_augment, gen)
                    out = model(x_tr[idx].to(dev), mask.to(dev), _rows(s_tr, idx, dev))
                    loss = loss_fn(out.logits, y_tr[idx].to(dev))
                    if t_tr is not None:
                        target = t_tr[idx].to(dev)
                        use = torch.isfinite(target) & torch.isfinite(out.token_logits)
                        if bool(use.any()):
                            tok_loss = nn.functional.binary_cross_entropy_with_logits(
                                out.token_logits[use], target[use]
                            )
                            loss = loss + token_loss_weight * tok_loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
                    total += float(loss.detach()) * idx.numel()
                    count += idx.numel()
                val_logits = _scores(model, x_va, m_va, s_va, max(batch_size, 256), dev)
                val_auc = auroc(y_va.numpy(), val_logits)
                val_loss = _weighted_bce(val_logits, y_va.numpy(), pos_weight)
                epoch += 1
                history.train_loss.append(total / count)
                history.val_auroc.append(val_auc)
                history.val_loss.append(val_loss)
                history.epochs_run = epoch
                if selection == "val_loss":
                    better = history.best_epoch < 0 or val_loss < history.best_val_loss
                else:
                    better = history.best_epoch < 0 or val_auc > history.best_val_auroc
                if better:
                    history.best_epoch, history.best_val_auroc, bad_epochs = epoch, val_auc, 0
                    history.best_val_loss = val_loss
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_epochs += 1
                    if bad_epochs >= patience:
                        history.stopped_early = True
                if ckpt is not None:
                    info = {
                        "format_version": STATE_FORMAT_VERSION,
                        "hf_flowcheck_version": __version__,
                        "epoch": epoch,
                        "bad_epochs": bad_epochs,
                        "best_epoch": history.best_epoch,
                        "best_val_auroc": history.best_val_auroc,
                        "best_val_loss": history.best_val_loss,
                        "val_loss": history.val_loss,
                        "stopped_early": history.stopped_early,
                        "train_loss": history.train_loss,
                        "val_auroc": history.val_auroc,
                        "run": run_key,
                    }
                    _save_state(ckpt, model, best_state, optimizer, info)
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}", val_auroc=f"{val_auc:.4f}", best=history.best_epoch)
        finally:
            bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    model.requires_grad_(True)  # a frozen probe branch is frozen for this training only
    if state_init != "random" and history.best_epoch == 0:
        logger.warning(
            "train_validator: no epoch beat the hidden-state probe on validation, so the kept validator is the probe "
            "itself: its event head is zero and its culprit (token, block) carries no information."
        )
    model.eval()
    model.training_metadata.update(
        {
            "hyperparameters": {**hyper, "epochs": int(epochs), "pos_weight": pos_weight},
            "history": history.to_dict(),
            "selection": f"{selection} on the validation split (early stopping on validation; test split unused)",
        }
    )
    if ckpt is not None:
        model.save_pretrained(ckpt / "best")
    return model, history
