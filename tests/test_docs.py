"""The README documents every ReFINE config field, and its default matches the code."""

import dataclasses
import re
from pathlib import Path

from trl_refine import NSPGRPOConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
OWN_FIELDS = [
    f.name
    for f in dataclasses.fields(NSPGRPOConfig)
    if f.name.startswith(("nsp_", "ntp_")) or f.name in ("document_column", "documents_per_device")
]


def test_every_refine_field_is_in_the_config_reference():
    missing = [name for name in OWN_FIELDS if f"`{name}`" not in README]
    assert not missing, f"README config reference lacks {missing}"


def test_documented_defaults_match_the_code():
    defaults = {f.name: f.default for f in dataclasses.fields(NSPGRPOConfig)}
    for name in ("nsp_num_chunks", "nsp_rollout_length", "nsp_num_rollouts", "nsp_margin", "nsp_max_length"):
        row = re.search(rf"\| `{name}` \| ([^|]+) \|", README)
        assert row, name
        assert row.group(1).strip() == str(defaults[name]), name
    for name in ("nsp_selection", "nsp_reward", "nsp_group_by", "nsp_engine", "nsp_short_documents"):
        row = re.search(rf"\| `{name}` \| `([^`]+)` \|", README)
        assert row and row.group(1) == defaults[name], name
