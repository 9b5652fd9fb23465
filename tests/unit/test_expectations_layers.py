"""An author's expectations table on top of the shipped one (qbd.expectations_layers): their
entries join, the shipped findings keep judging the built-ins, nothing of qbd's can be replaced,
and `extends = false` stands alone; --qbd-accept writes only its proposals, keeping the file."""

from __future__ import annotations

import pytest

from qbd.errors import ConfigError
from qbd.expectations import load, load_for, shipped

MINE = "digits/fp32/my-defense[canonical]"


def _mine(tmp_path, body: str, meta: str = "") -> str:
    p = tmp_path / "my.toml"
    p.write_text(f"# my findings\n[meta]\ntier = \"smoke\"\n{meta}\n[cells.\"{MINE}\"]\noutcome = \"miss\"\nwhy = \"my figures\"\n{body}")
    return str(p)


def test_the_authors_table_adds_to_the_shipped_one(tmp_path):
    base = load(shipped("smoke"))
    layered = load_for("smoke", _mine(tmp_path, ""))
    assert layered.cells[MINE]["outcome"] == "miss"
    assert {k: v for k, v in layered.cells.items() if k != MINE} == base.cells  # every shipped finding still applies
    assert layered.rows == base.rows and layered.attack == base.attack and layered.attacks.keys() == base.attacks.keys()
    assert layered.source == f"{shipped('smoke')} + {tmp_path / 'my.toml'}"
    assert (layered.min_clean_acc, layered.min_asr) == (base.min_clean_acc, base.min_asr)


def test_it_cannot_replace_an_entry_of_qbds(tmp_path):
    shipped_row = next(iter(load(shipped("smoke")).rows))
    with pytest.raises(ConfigError, match="is declared by the table qbd ships"):
        load_for("smoke", _mine(tmp_path, f"\n[rows.\"{shipped_row}\"]\nmax_detection_rate = 1.0\nwhy = \"mine\"\n"))
    with pytest.raises(ConfigError, match="is not the attack the shipped table's findings were measured on"):
        load_for("smoke", _mine(tmp_path, "", 'attack = { name = "badnet", target = 3 }'))


def test_extends_false_stands_alone(tmp_path):
    alone = load_for("smoke", _mine(tmp_path, "", "extends = false"))
    assert set(alone.cells) == {MINE} and not alone.rows and alone.source == str(tmp_path / "my.toml")
    with pytest.raises(ConfigError, match=r"meta\.extends must be true or false"):
        load_for("smoke", _mine(tmp_path, "", 'extends = "no"'))


def test_accept_writes_only_its_proposals_and_keeps_the_file(tmp_path):
    from qbd.expectations_write import add_cells

    path = tmp_path / "my.toml"
    _mine(tmp_path, "# a comment the author wrote\n")
    before = path.read_text()
    new = "digits/int8-static/my-defense[canonical]"
    add_cells(path, {new: {"outcome": "invalid", "reason_code": "no-gradient", "why": "PROPOSED: write it"}}, "header", "smoke")
    after = path.read_text()
    assert after.startswith(before.rstrip("\n"))  # everything the author wrote, as written
    assert "# a comment the author wrote" in after and f'[cells."{new}"]' in after
    assert load(path).cells[new] == {"outcome": "invalid", "reason_code": "no-gradient", "why": "PROPOSED: write it"}
    fresh = tmp_path / "new.toml"
    add_cells(fresh, {new: {"outcome": "miss", "why": "w"}}, "line one\nline two", "smoke")
    assert fresh.read_text().startswith("# line one\n# line two\n") and load_for("smoke", fresh).cells[new]["outcome"] == "miss"
