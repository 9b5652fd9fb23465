"""The smoke matrix: every (dataset, scheme, defense, protocol) cell, the attack (Table 2) and the
quantizer audits, parametrized by the qbd plugin and checked against
fixtures/expectations/<tier>.toml."""

from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401
