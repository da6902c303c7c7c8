import json

import pytest

from hf_flowcheck import FlowConfig
from hf_flowcheck.configuration import FULL_FEATURES, PAPER_FEATURES


def test_defaults_match_spec():
    c = FlowConfig()
    assert (c.boundary, c.token_mask, c.window_length, c.window_stride) == ("normalized", "response", 8, 4)
    assert (c.num_competitors, c.subspace_dim, c.direction_cap) == (32, 16, 1024)
    assert (c.transport_min_overlap, c.center, c.drift_anchor, c.features, c.seed) == (
        0.0,
        "geometric_median",
        "end",
        "full",
        0,
    )
    assert c.feature_names == FULL_FEATURES
    assert FULL_FEATURES == (
        "step",
        "step_centered",
        "turn",
        "attn_mag",
        "mlp_mag",
        "update_mag",
        "residual_ratio",
        "drift",
        "attn_turn_ratio",
        "mlp_turn_ratio",
    )
    assert FlowConfig(features="paper").feature_names == PAPER_FEATURES == FULL_FEATURES[:8]
    assert c.basis_solver == "eigh"


def test_basis_solver_changes_how_not_what():
    c, fast = FlowConfig(), FlowConfig(basis_solver="subspace")
    assert "basis_solver" not in c.signature_key() and "basis_solver" in fast.signature_key()
    assert c.same_features(fast) and fast.same_features(c)
    assert not c.same_features(FlowConfig(seed=1))


def test_competitor_candidates_change_the_features_and_the_key():
    c, cand = FlowConfig(), FlowConfig(competitor_candidates=256)
    assert "competitor_candidates" not in c.signature_key() and "competitor_candidates" in cand.signature_key()
    assert not c.same_features(cand)
    assert FlowConfig.from_dict(cand.to_dict()) == cand


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"boundary": "pre"}, "boundary='pre'"),
        ({"center": "median"}, "'geometric_median'"),
        ({"window_length": 0}, "window_length=0"),
        ({"subspace_dim": 2.5}, "subspace_dim=2.5"),
        ({"transport_min_overlap": 1.5}, "transport_min_overlap"),
        ({"features": "all"}, "features='all'"),
        ({"window_length": 2, "window_stride": 3}, "window_stride=3"),
        ({"basis_solver": "lanczos"}, "basis_solver='lanczos'"),
        ({"competitor_candidates": -1}, "competitor_candidates=-1"),
        ({"competitor_candidates": True}, "competitor_candidates=True"),
        ({"competitor_candidates": 32}, "competitor_candidates > 32"),
    ],
)
def test_bad_values_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        FlowConfig(**kw)


def test_round_trip_and_version_stamps():
    c = FlowConfig(boundary="residual", seed=3)
    d = json.loads(c.to_json())
    assert d["format_version"] == FlowConfig.FORMAT_VERSION and "hf_flowcheck_version" in d
    assert FlowConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="Unknown FlowConfig field"):
        FlowConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="newer"):
        FlowConfig.from_dict({**d, "format_version": 99})
