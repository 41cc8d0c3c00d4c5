"""Object proposals in the configuration: keys, checks, and what they do to artifact versions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from artifacts.store import Store
from pipeline.config import Config, MasksConfig, load_config
from pipeline.configtypes import ConfigError
from pipeline.graph import Context, plan
from pipeline.stagedefs import pipeline_stages
from stages.masks.params import ProposalParams

REPO = Path(__file__).resolve().parents[2]


def _versions(tmp_path, make_box_dataset, *sets: str) -> dict[str, str]:
    root = tmp_path / "data"
    if not root.exists():
        make_box_dataset(root, ["background", "a", "b", "c"], {"train": 3, "val": 2})
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={root}", "train.device=cpu", "extract.device=cpu",
                                                  *sets])
    ctx = Context(cfg=cfg, store=Store(tmp_path / "store"), quiet=True)
    return {name: p.version for name, p in plan(ctx, pipeline_stages(ctx)).items()}


def test_config_keys_build_the_stage_parameters():
    assert MasksConfig().proposal_params == ProposalParams()
    defaults = {f.name: f.default for f in dataclasses.fields(MasksConfig)}
    assert {k: defaults[k] for k in ("proposals", "max_proposals", "min_proposal")} == dataclasses.asdict(ProposalParams())
    m = MasksConfig(proposals="components", max_proposals=2, min_proposal=0.05)
    assert m.proposal_params == ProposalParams("components", 2, 0.05) and m.proposal_params.multiple


@pytest.mark.parametrize("sets, key, message", [
    (("masks.proposals=cuts",), "masks.proposals", "cuts proposals come from the features estimator"),
    (("masks.proposals=blobs",), "masks.proposals", "expected one of 'single', 'components', 'cuts'"),
    (("masks.max_proposals=0",), "masks.max_proposals", "must be an int >= 1, got 0"),
    (("masks.min_proposal=1.0",), "masks.min_proposal", r"must be a number in \[0, 1\), got 1.0"),
])
def test_bad_proposal_settings_name_the_key(sets, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(REPO / "configs/demo.yaml", list(sets))
    assert info.value.key == key


def test_cuts_are_accepted_with_the_features_estimator():
    cfg = load_config(REPO / "configs/demo.yaml", ["masks.method=features", "masks.proposals=cuts"])
    assert cfg.masks.proposal_params.proposals == "cuts"


def test_single_keeps_every_version_and_the_others_move_masks_and_what_follows(tmp_path, make_box_dataset):
    default = _versions(tmp_path, make_box_dataset)
    explicit = _versions(tmp_path, make_box_dataset, "masks.proposals=single", "masks.max_proposals=5",
                         "masks.min_proposal=0.2")
    assert explicit == default  # single ignores the cap and the floor
    comps = _versions(tmp_path, make_box_dataset, "masks.proposals=components")
    assert all(comps[s] != default[s] for s in default)
    capped = _versions(tmp_path, make_box_dataset, "masks.proposals=components", "masks.max_proposals=2")
    assert capped["masks"] != comps["masks"]
    assert "proposals" not in Config().section("masks")  # a since_default key at its default
