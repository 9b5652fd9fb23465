"""qbd quant audit (qbd/quant_cli.py), driven through its own argparse parser."""

from __future__ import annotations

import argparse
import json

import pytest

from qbd import quant_cli as cli
from qbd.config import ConfigError


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
        (["--model", "tiny-cnn", "--untrained", "--scheme", "int3-real"], "unknown quantization scheme"),
        (["--model", "vgg", "--untrained", "--scheme", "fp32"], "unknown model"),
        (["--model", "tiny-cnn", "--untrained", "--scheme", "fp32", "--num-classes", "1"], r"must be in \[2, 100000\]"),
        (["--model", "tiny-cnn", "--untrained", "--scheme", "fp32", "--engine", "x86"], "takes no quantized engine"),
    ],
)
def test_user_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(["quant", "audit", *argv])


def test_source_is_required() -> None:
    with pytest.raises(SystemExit):
        run(["quant", "audit", "--model", "tiny-cnn", "--scheme", "fp32"])


def test_dataset_without_data_is_a_usage_error(tmp_path, monkeypatch) -> None:
    from qbd.errors import DataUnavailableError

    monkeypatch.delenv("QBD_DATA_ROOT", raising=False)
    with pytest.raises(DataUnavailableError, match="CIFAR-10 needs a data root"):
        run(["quant", "audit", "--model", "tiny-cnn", "--dataset", "cifar10", "--scheme", "fp32", "--cache-dir", str(tmp_path)])


def test_trained_model_from_the_store(capsys) -> None:
    """The default digits model (the one the smoke matrix uses, from the session's store): the
    audit of the deployed int8-dynamic model plus its clean accuracy and ASR."""
    assert run(["quant", "audit", "--model", "tiny-cnn", "--dataset", "digits", "--scheme", "int8-dynamic", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"].startswith("digits/tiny-cnn/badnet-t0-white3-bottom-right") and report["num_classes"] == 10
    assert report["audit"]["input_gradient"] is False and report["audit"]["quantized_modules"] == ["head"]
    assert report["deployed"]["clean_acc"] > 0.9 and report["deployed"]["asr"] > 0.9
