"""qbd quant audit (qbd/quant/cli.py), driven through its own argparse parser."""

from __future__ import annotations

import argparse
import json

import pytest

from qbd.config import ConfigError
from qbd.quant import cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qbd")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_table(capsys) -> None:
    assert (
        run(["quant", "audit", "--model", "tiny-cnn", "--untrained", "--scheme", "int8-dynamic", "--engine", "qnnpack"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "quant audit: tiny-cnn (untrained, 10 classes), scheme int8-dynamic"
    for field in ("quantized_param_fraction", "input_gradient", "engine", "model_bytes", "quantized_modules"):
        assert field in out
    assert "qnnpack" in out and "1: head" in out


def test_json(capsys) -> None:
    assert (
        run(
            [
                "quant",
                "audit",
                "--model",
                "tiny-cnn",
                "--untrained",
                "--scheme",
                "int4-sim",
                "--json",
                "--num-classes",
                "7",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 7 and report["source"] == "untrained"
    audit = report["audit"]
    assert audit["scheme"] == "int4-sim" and audit["bits"] == 4 and audit["input_gradient"] is True


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model", "tiny-cnn", "--dataset", "cifar10", "--scheme", "fp32"], "not available yet"),
        (["--model", "tiny-cnn", "--untrained", "--scheme", "int3-real"], "unknown quantization scheme"),
        (["--model", "vgg", "--untrained", "--scheme", "fp32"], "unknown model"),
        (["--model", "tiny-cnn", "--untrained", "--scheme", "fp32", "--num-classes", "1"], "at least 2"),
        (["--model", "tiny-cnn", "--untrained", "--scheme", "fp32", "--engine", "x86"], "takes no quantized engine"),
    ],
)
def test_user_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(["quant", "audit", *argv])


def test_source_is_required() -> None:
    with pytest.raises(SystemExit):
        run(["quant", "audit", "--model", "tiny-cnn", "--scheme", "fp32"])
