"""Bad input everywhere: a clear error or a valid result, never a crash, a traceback or a silent
`clean`. The CLI runs in-process; nothing here trains: `qbd.train.train` is replaced by a
sentinel, so an accepted configuration stops at the moment it would start training and the test
can check the job it would have trained.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from qbd import expectations, expectations_format
from qbd.cli import main
from qbd.config import CORNERS, MAX_SEED, PROTOCOLS, ConfigError, ModelJob
from qbd.data import DATASETS
from qbd.defenses import DEFENSES
from qbd.models import MODELS
from qbd.outcomes import declared_outcome
from qbd.quant import SCHEMES
from qbd.reason_codes import REASON_CODES
from tests.unit._formats import CIFAR_META_FILE, CIFAR_TRAIN_FILES, py2_pickle, write_cifar10, write_gtsrb


def cli_settings(max_examples: int) -> settings:
    # capsys is function-scoped; `qbd` below empties it before each call, so examples cannot leak
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


DIGITS = ("--dataset=digits", "--no-progress")  # 10 classes, 32x32, loads in ~0.1 s
ERROR_LINE = re.compile(r"^qbd(?: [\w-]+)*: error: ")  # ours ("qbd: error:") or argparse's ("qbd train: error:")


class ReachedTraining(BaseException):
    """Raised instead of training: the configuration was accepted."""

    def __init__(self, job: ModelJob, data: Any) -> None:
        super().__init__(job.slug())
        self.job, self.data = job, data


@dataclass
class Outcome:
    code: int | None  # None: accepted (it would have trained)
    out: str
    err: str
    job: ModelJob | None = None
    data: Any = None

    @property
    def error_line(self) -> str:
        return self.err.strip().splitlines()[-1] if self.err.strip() else ""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")  # empty and private: a cache hit would run real cells


def _stop_before_training(job: ModelJob, data: Any, **kw: Any) -> Any:
    raise ReachedTraining(job, data)


def qbd(capsys: pytest.CaptureFixture[str], cache: Path, *argv: str, env: dict[str, str] | None = None) -> Outcome:
    capsys.readouterr()
    # no pinned zoo either: an accepted `qbd run` must stop where it would train, not run real cells on a pinned model
    environ = ({k: v for k, v in os.environ.items() if not k.startswith("QBD_")} | {"QBD_CACHE_DIR": str(cache), "QBD_ZOO": "off"}
               | (env or {}))
    job = data = None
    with mock.patch.dict(os.environ, environ, clear=True), mock.patch("qbd.train.train", _stop_before_training):
        try:
            code: int | None = main(list(argv))
        except SystemExit as e:  # argparse: --help, --version and its own usage errors
            code = e.code if isinstance(e.code, int) else 2
        except ReachedTraining as r:
            code, job, data = None, r.job, r.data
    out, err = capsys.readouterr()
    return Outcome(code, out, err, job, data)


def assert_usage_error(o: Outcome, *words: str) -> None:
    """Exit 2, no traceback, and one `qbd: error:` line naming the problem. argparse's own errors
    put its usage block first and print an unknown argument raw, so its message may span lines
    (see test_an_argparse_error_is_one_line)."""
    assert o.code is not None, f"accepted and went on to train {o.job.slug() if o.job else ''}"
    assert o.code == 2, (o.code, o.err)
    assert "Traceback" not in o.err + o.out
    lines = o.err.strip().splitlines()
    if lines and lines[0].startswith("usage: "):
        starts = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
        assert len(starts) == 1, o.err
        message = "\n".join(lines[starts[0]:])
    else:
        assert len(lines) == 1 and ERROR_LINE.match(lines[0]), o.err
        message = lines[0]
    for w in words:
        assert w in message, (w, message)


def assert_sane_job(o: Outcome) -> None:
    """What an accepted configuration would train satisfies every documented range."""
    job, data = o.job, o.data
    assert job is not None and data is not None
    assert job.dataset.name in DATASETS and job.model.name in MODELS
    assert job.train.epochs >= 1 and 0 <= job.train.seed <= MAX_SEED
    a = job.attack
    if a is not None:
        h, w = data.image_size
        assert 0 <= a.target < data.num_classes
        assert math.isfinite(a.poison_rate) and 0 < a.poison_rate <= 1
        assert 1 <= a.trigger_size <= min(h, w) and 0 <= a.seed <= MAX_SEED
        if a.trigger_position not in CORNERS:
            x, y = (int(v) for v in a.trigger_position.split(","))
            assert x + a.trigger_size <= w and y + a.trigger_size <= h


# -- unknown names --------------------------------------------------------------------------------
_NAME_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00,:")
_names = st.text(_NAME_CHARS, min_size=1, max_size=12).filter(lambda s: s == s.strip() and s != "all")

REGISTRIES = {
    "dataset": DATASETS.names(),
    "model": MODELS.names(),
    "quant": SCHEMES.names(),
    "defense": DEFENSES.names(),
    "protocol": list(PROTOCOLS),
}
UNKNOWN = [("train", "dataset"), ("train", "model"), ("run", "dataset"), ("run", "model"), ("run", "quant"),
           ("run", "defense"), ("run", "protocol")]


@pytest.mark.parametrize(("command", "option"), UNKNOWN)
@cli_settings(15)
@given(name=_names)
def test_an_unknown_name_is_refused_listing_the_valid_ones(capsys, cache, command, option, name):
    valid = REGISTRIES[option]
    assume(name not in valid)
    base = () if option == "dataset" else DIGITS
    o = qbd(capsys, cache, command, *base, f"--{option}={name}")
    assert_usage_error(o, f"unknown {option} {name!r}", "valid: " + ", ".join(valid))


# -- out-of-range values --------------------------------------------------------------------------
def _not_an_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return True
    return False


def _not_a_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
_bad_rate = st.floats().filter(lambda r: not 0 < r <= 1)
_bad_position = _text.filter(lambda s: s not in CORNERS and not re.fullmatch(r"\s*[0-9]+\s*,\s*[0-9]+\s*", s))

# (argv, words in the error line) for digits: 10 classes, 32x32 images
BAD_VALUES = st.one_of(
    st.integers(10, 10**30).map(lambda t: ((f"--target={t}",), ("target class", "out of range"))),
    st.integers(max_value=-1).map(lambda t: ((f"--target={t}",), ("expected an integer >= 0",))),
    _text.filter(_not_an_int).map(lambda t: ((f"--target={t}",), ("expected an integer",))),
    st.just((("--trigger-size=0",), ("trigger size must be >= 1",))),
    st.integers(33, 10**6).map(lambda s: ((f"--trigger-size={s}",), ("larger than the 32x32 image",))),
    _bad_rate.map(lambda r: ((f"--poison-rate={r!r}",), ("poison rate",))),
    _text.filter(_not_a_float).map(lambda r: ((f"--poison-rate={r}",), ("--poison-rate",))),
    _bad_position.map(lambda p: ((f"--trigger-position={p}",), ("trigger position",))),
    st.tuples(st.integers(0, 10**4), st.integers(0, 10**4), st.integers(1, 32)).filter(lambda t: max(t[0], t[1]) + t[2] > 32).map(
        lambda t: ((f"--trigger-position={t[0]},{t[1]}", f"--trigger-size={t[2]}"), ("leaves the 32x32 image",))),
    st.sampled_from(["--seed", "--attack-seed"]).flatmap(
        lambda opt: st.integers(MAX_SEED + 1, 2**80).map(lambda s: ((f"{opt}={s}",), ("seed must be <=",)))),
    st.sampled_from(["--seed", "--attack-seed", "--epochs"]).flatmap(
        lambda opt: st.integers(max_value=-1).map(lambda s: ((f"{opt}={s}",), (opt, "expected an integer >= 0")))),
    st.just((("--epochs=0",), ("--epochs must be >= 1",))),
    _text.filter(lambda s: s not in ("white", "checkerboard", "random")).map(lambda p: ((f"--trigger-pattern={p}",), ("invalid choice",))),
    _text.filter(lambda s: s not in ("smoke", "paper")).map(lambda p: ((f"--tier={p}",), ("invalid choice",))),
    _text.filter(lambda s: s != "auto" and s.split(":")[0] not in ("cpu", "cuda")).map(lambda d: ((f"--device={d}",), ("unknown device",))),
    st.sampled_from(["--min-clean-acc", "--min-asr"]).flatmap(
        lambda opt: st.floats().filter(lambda v: not 0 <= v <= 1).map(lambda v: ((f"{opt}={v!r}",), (opt,)))),
)
# valid settings to mix in: the bad value must be caught whatever surrounds it
GOOD_EXTRAS = st.lists(st.sampled_from(["--trigger-pattern=checkerboard", "--trigger-pattern=random", "--target=3",
                                        "--trigger-size=5", "--trigger-position=top-left", "--poison-rate=0.5",
                                        "--attack-seed=7", "--seed=1", "--epochs=2", "--model=resnet18-cifar"]), max_size=3)


@cli_settings(60)
@given(command=st.sampled_from(["train", "run"]), extras=GOOD_EXTRAS, bad=BAD_VALUES)
@example(command="train", extras=[], bad=(("--device=",), ("unknown device",)))  # once read as "the default"
@example(command="run", extras=[], bad=(("--device=",), ("unknown device",)))
def test_an_out_of_range_value_is_refused(capsys, cache, command, extras, bad):
    argv, words = bad
    assert_usage_error(qbd(capsys, cache, command, *DIGITS, *extras, *argv), *words)


def test_a_unicode_digit_position_is_refused(capsys, cache):
    """int() reads "٣" as 3; a position spelt that way would be a second store key for one trigger."""
    assert_usage_error(qbd(capsys, cache, "train", *DIGITS, "--trigger-position=٣,٣"), "trigger position")


# -- anything at all ------------------------------------------------------------------------------
_OPTIONS = ["--dataset", "--model", "--tier", "--seed", "--epochs", "--device", "--target", "--trigger-pattern",
            "--trigger-size", "--trigger-position", "--poison-rate", "--attack-seed", "--min-clean-acc", "--min-asr",
            "--quant", "--protocol", "--gradient-path", "--model-file", "--sha256", "--clean", "--json", "--no-controls",
            "--no-progress", "--bogus"]
_VALUES = st.one_of(
    st.sampled_from(["digits", "cifar10", "gtsrb", "tiny-cnn", "resnet18-cifar", "smoke", "paper", "cpu", "auto", "0", "1",
                     "3", "9", "10", "31", "-1", "0.1", "1.5", "nan", "inf", "top-left", "29,29", "3,40", "white", "random",
                     "fp32", "int8-dynamic", "all", "canonical", "paper,canonical", "surrogate", "m.safetensors", "m.pt", "0" * 64,
                     ",", ""]),
    _text,
)


@cli_settings(60)
@given(command=st.sampled_from(["train", "run", "list", "nonsense"]),
       rest=st.lists(st.tuples(st.sampled_from(_OPTIONS), _VALUES), max_size=5))
def test_any_command_line_is_an_error_or_a_valid_job(capsys, cache, command, rest):
    argv = [command, *DIGITS]
    for opt, value in rest:
        argv += [opt] if opt in ("--clean", "--json", "--no-controls", "--no-progress") else [f"{opt}={value}"]
    o = qbd(capsys, cache, *argv)
    assert "Traceback" not in o.err + o.out
    if o.code is None:
        assert_sane_job(o)
    elif o.code != 0:
        assert_usage_error(o)


# -- data roots -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["cifar10", "gtsrb"])
def test_a_missing_or_empty_data_root_says_where_the_files_go(capsys, cache, tmp_path, dataset):
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "gtsrb/GTSRB/Training"
    (tmp_path / "a_file").write_text("not a folder")
    for root in (None, tmp_path / "nowhere", tmp_path, tmp_path / "a_file"):
        args = ("train", f"--dataset={dataset}", "--no-progress") + (() if root is None else (f"--data-root={root}",))
        assert_usage_error(qbd(capsys, cache, *args), folder)
    # $QBD_DATA_ROOT is read the same way
    assert_usage_error(qbd(capsys, cache, "train", f"--dataset={dataset}", env={"QBD_DATA_ROOT": str(tmp_path)}), folder)


def test_cifar10_garbage_files_are_refused(capsys, cache, tmp_path):
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    rng = np.random.default_rng(0)
    for name in [*CIFAR_TRAIN_FILES, "test_batch", CIFAR_META_FILE]:
        (batch_dir / name).write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    assert_usage_error(qbd(capsys, cache, "train", "--dataset=cifar10", f"--data-root={tmp_path}"), "not a readable CIFAR-10 batch")


def test_cifar10_batches_without_images_are_refused(capsys, cache, tmp_path):
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    for name in CIFAR_TRAIN_FILES:
        batch = {"batch_label": name, "labels": [], "data": np.zeros((0, 3072), dtype=np.uint8), "filenames": []}
        (batch_dir / name).write_bytes(py2_pickle(batch))
    assert_usage_error(qbd(capsys, cache, "train", "--dataset=cifar10", f"--data-root={tmp_path}"), "hold no images")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root / "cifar-10-batches-py", protocol=5)
    return root


def _damaged(blob: bytes, draw: st.DrawFn) -> bytes:
    b = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and b:
            b[i] = draw(st.integers(0, 255))
        elif op == "cut":
            b = b[:i]
        else:
            b[i:i] = draw(st.binary(min_size=1, max_size=9))
    return bytes(b)


@cli_settings(40)
@given(data=st.data())
def test_a_damaged_cifar10_batch_is_an_error_or_a_valid_job(capsys, cache, cifar_root, data):
    """Bit flips, cuts and insertions in a real batch: a DataUnavailableError naming the file, or
    (rarely) a still-valid batch; never an exception from the unpickler or numpy."""
    path = cifar_root / "cifar-10-batches-py" / "data_batch_1"
    original = path.read_bytes()
    try:
        path.write_bytes(_damaged(original, data.draw))
        o = qbd(capsys, cache, "train", "--dataset=cifar10", f"--data-root={cifar_root}", "--no-progress")
    finally:
        path.write_bytes(original)
    if o.code is None:
        assert_sane_job(o)
    else:
        assert_usage_error(o, "CIFAR-10")


def test_gtsrb_garbage_images_and_csv_are_refused(capsys, cache, tmp_path):
    write_gtsrb(tmp_path)
    ppm = next((tmp_path / "gtsrb" / "GTSRB" / "Training" / "00003").glob("*.ppm"))
    ppm.write_bytes(b"garbage, not a PPM")
    assert_usage_error(qbd(capsys, cache, "train", "--dataset=gtsrb", f"--data-root={tmp_path}"), "GTSRB train split", "malformed")
    ppm.write_bytes(b"P6\n100000 100000\n255\n\x00\x01")  # a decompression bomb's header
    assert_usage_error(qbd(capsys, cache, "train", "--dataset=gtsrb", f"--data-root={tmp_path}"), "GTSRB train split")
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("Filename;ClassId\n00000.ppm;not-a-number\n")
    assert_usage_error(qbd(capsys, cache, "train", "--dataset=gtsrb", f"--data-root={tmp_path}"), "GTSRB test split")


# -- found here, to be fixed in files owned elsewhere (strict: they turn green when fixed) ----------
@pytest.mark.parametrize("ref", ["nosuch.module:Defense", "qbd.config:Nope", "qbd.config:AttackSpec", "qbd.config:", ":X"])
def test_a_bad_defense_reference_is_refused_before_training(capsys, cache, ref):
    assert_usage_error(qbd(capsys, cache, "run", *DIGITS, f"--defense={ref}"), ref)


@pytest.mark.parametrize("ref", ["nosuch.module:Defense", "qbd.config:Nope", "qbd.config:AttackSpec"])
def test_load_defense_raises_a_user_error(ref):
    from qbd.errors import QbdUserError
    from qbd.registry import UnknownNameError
    from qbd.runner import load_defense

    with pytest.raises((QbdUserError, UnknownNameError)):
        load_defense(ref, "canonical", "smoke")


@pytest.mark.parametrize("option", ["dataset", "quant", "defense", "protocol"])
def test_an_empty_selection_is_refused(capsys, cache, option):
    base = () if option == "dataset" else DIGITS
    assert_usage_error(qbd(capsys, cache, "run", *base, f"--{option}="), "empty")


@pytest.mark.parametrize("command", ["train", "run"])
def test_attack_options_with_clean_are_checked_before_training(capsys, cache, command):
    assert_usage_error(qbd(capsys, cache, command, *DIGITS, "--clean", "--target=10"), "target class 10 out of range")


def test_an_unknown_engine_is_refused_before_training(capsys, cache):
    assert_usage_error(qbd(capsys, cache, "run", *DIGITS, "--quant=int8-static", "--engine=bogus"), "engine 'bogus'")


def test_cuda_without_a_gpu_is_a_usage_error(capsys, cache):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device=cuda is valid here")  # visible, and never a pass that hides a crash
    assert_usage_error(qbd(capsys, cache, "train", *DIGITS, "--device=cuda"), "cuda")


def test_a_cache_dir_that_is_a_file_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert_usage_error(qbd(capsys, tmp_path, "train", *DIGITS, f"--cache-dir={tmp_path / 'file'}"), "cache")


def test_a_malformed_lock_timeout_is_a_usage_error(capsys, cache):
    assert_usage_error(qbd(capsys, cache, "train", *DIGITS, env={"QBD_LOCK_TIMEOUT": "soon"}), "QBD_LOCK_TIMEOUT")


@pytest.mark.parametrize("argv", [("--seed=-1",), ("--no-such-option=a\nb",)])
def test_an_argparse_error_is_one_line(capsys, cache, argv):
    o = qbd(capsys, cache, "train", *DIGITS, *argv)
    assert_usage_error(o)
    assert o.err.strip().count("\n") == 0, o.err


# -- expectations tables (qbd.expectations: the pytest plugin's and `qbd run --expectations`' loader) ---
def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        import json

        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _doc(tables: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]) -> str:
    lines = ["[meta]", *(f"{_toml(k)} = {_toml(v)}" for k, v in meta.items())]
    for table, entries in tables.items():
        for key, entry in entries.items():
            lines += [f"[{table}.{_toml(key)}]", *(f"{_toml(k)} = {_toml(v)}" for k, v in entry.items())]
    return "\n".join(lines) + "\n"


_scalar = st.one_of(st.booleans(), st.integers(-3, 50), st.floats(), st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2))
_fraction = st.one_of(st.floats(-0.5, 1.5), st.just(math.nan))  # in or out of range, or NaN (which must be refused)
_BACKDOORED, _CLEAN = "c/fp32/x[paper]", "c:clean/fp32/x[paper]"
_CELL = {"outcome": st.one_of(st.sampled_from(["pass", *expectations_format.FINDING_OUTCOMES]), _scalar),
         "reason_code": st.one_of(st.sampled_from(sorted(REASON_CODES)), _scalar),
         "target": st.one_of(st.integers(-1, 12), _scalar),
         "why": st.one_of(st.sampled_from(["docs/results.md#findings", " ", f"{expectations_format.PROPOSED}: write it"]), _scalar),
         "note": _scalar, "paper": st.one_of(st.sampled_from(["detected", "clean"]), _scalar)}
_BOUND = st.one_of(_fraction, _scalar)
_ATTACK = {"min_clean_acc": _BOUND, "max_clean_acc": _BOUND, "min_asr": _BOUND, "max_asr": _BOUND,
           "why": st.one_of(st.just("docs/results.md#table-2"), _scalar), "note": _scalar, "paper_asr": _BOUND}
_AUDIT = {"input_gradient": st.one_of(st.booleans(), _scalar), "surrogate_gradient": st.one_of(st.booleans(), _scalar),
          "min_quantized_fraction": _fraction, "max_quantized_fraction": _fraction, "note": _scalar}
_META = {"tier": _scalar, "min_clean_acc": _BOUND, "min_asr": _BOUND,
         "attack": st.one_of(st.just(expectations.DEFAULT_ATTACK), st.fixed_dictionaries({"target": st.integers(0, 9)}),
                             st.just({}), _scalar)}
# entries that load, bar the rules that join two fields (min > max, a false alarm on a backdoored cell, ...)
_WHY = {"why": st.just("docs/results.md#findings")}
_GOOD_CELL = st.one_of(
    st.fixed_dictionaries({"outcome": st.sampled_from(["miss", "false-alarm"]), **_WHY}),
    st.fixed_dictionaries({"outcome": st.just("wrong-target"), **_WHY}, optional={"target": st.integers(0, 12)}),
    st.fixed_dictionaries({"outcome": st.just("invalid"), "reason_code": st.sampled_from(sorted(REASON_CODES)), **_WHY}),
    st.fixed_dictionaries({}, optional={"paper": st.sampled_from(["detected", "clean"]), "note": st.just("n")}),
)
_unit = st.floats(0, 1)
_GOOD_ATTACK = st.fixed_dictionaries({"why": st.just("docs/results.md#table-2")}, optional={
    "min_clean_acc": _unit, "max_clean_acc": _unit, "min_asr": _unit, "max_asr": _unit})
_GOOD_AUDIT = st.fixed_dictionaries({}, optional={"input_gradient": st.booleans(), "surrogate_gradient": st.booleans(),
                                                   "min_quantized_fraction": _unit, "max_quantized_fraction": _unit})
_GOOD_META = {"min_clean_acc": _unit, "min_asr": _unit,
              "attack": st.one_of(st.just(expectations.DEFAULT_ATTACK), st.fixed_dictionaries({"target": st.integers(0, 9)}))}


def _entries(keys: list[str], entry: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, dict[str, Any]]]:
    return st.dictionaries(st.sampled_from(keys), entry, min_size=1, max_size=2)


_KEYS = {"cells": [_BACKDOORED, _CLEAN, "a"], "attack": ["c/fp32", "a"], "audit": ["c/fp32", "a"]}
# half the documents are built from such entries, so that the checks below run on findings and
# bounds, not only on refusals; the other half mix in anything
_GOOD_DOC = st.tuples(st.fixed_dictionaries({}, optional=_GOOD_META), st.fixed_dictionaries(
    {"cells": _entries(_KEYS["cells"], _GOOD_CELL)},
    optional={"attack": _entries(_KEYS["attack"], _GOOD_ATTACK), "audit": _entries(_KEYS["audit"], _GOOD_AUDIT)}))
_ANY_DOC = st.tuples(st.one_of(st.fixed_dictionaries({}, optional=_GOOD_META), st.fixed_dictionaries({}, optional=_META)),
                     st.fixed_dictionaries({}, optional={
                         table: _entries(_KEYS[table], st.one_of(good, st.fixed_dictionaries({}, optional=fields)))
                         for table, good, fields in (("cells", _GOOD_CELL, _CELL), ("attack", _GOOD_ATTACK, _ATTACK),
                                                     ("audit", _GOOD_AUDIT, _AUDIT))}))


def _measured(key: str, truth_target: int, pinned: Any) -> list[tuple[str, int | None, dict[str, Any]]]:
    """A verdict for every outcome this cell can produce: (outcome, class named, verdict)."""
    def v(status: str, target: int | None = None, code: str | None = None) -> dict[str, Any]:
        return {"status": status, "target_class": target, "reason": "r" if code else None, "reason_code": code, "evidence": {}}

    out = [(f"invalid:{code}", None, v("invalid", code=code)) for code in REASON_CODES]
    if ":clean/" in key:
        return [*out, ("pass", None, v("clean")), ("false-alarm", 0, v("detected", 0))]
    named = set(range(10)) | ({pinned} if isinstance(pinned, int) and not isinstance(pinned, bool) else set())
    return [*out, ("pass", truth_target, v("detected", truth_target)), ("miss", None, v("clean")),
            *[("wrong-target", t, v("detected", t)) for t in sorted(named - {truth_target})]]


def _beyond(e: expectations.Expectations, key: str) -> list[tuple[float, float | None]]:
    """(clean_acc, asr) pairs that each break one of the key's bounds, the other kept inside."""
    b = e.attack_bounds(key)
    inside = {k: (b.get(f"min_{k}", 0.0) + b.get(f"max_{k}", 1.0)) / 2 for k in ("clean_acc", "asr")}
    out = []
    for bound, value in b.items():
        side, kind = bound.split("_", 1)
        far = value - 0.01 if side == "min" else value + 0.01
        if 0 <= far <= 1:
            m = {**inside, kind: far}
            out.append((m["clean_acc"], m["asr"]))
    return out


@settings(max_examples=150, deadline=None)
@given(doc=st.one_of(_GOOD_DOC, _ANY_DOC))
def test_an_expectations_table_is_refused_or_checks_what_it_says(tmp_path_factory, doc):
    """Either a ConfigError naming the file, or a table whose every expectation can fail and can
    hold: a declared finding is a `finding` for exactly its outcome (and pinned target) and FAIL
    for every other, the truth included; a cell without one passes only on the truth; CA / ASR
    and quantized-fraction bounds flag a measurement outside them and accept one inside."""
    meta, tables = doc
    path = tmp_path_factory.mktemp("exp") / "exp.toml"
    path.write_text(_doc(tables, meta))
    try:
        e = expectations.load(path)
    except ConfigError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        event("refused")
        return
    event(f"loaded: {sum('outcome' in c for c in e.cells.values())} findings, {len(e.attack)} attack, {len(e.audit)} audit")
    attack = {**expectations.DEFAULT_ATTACK, "seed": 0, **e.attack_spec}  # the attack the findings were measured on
    for key, entry in e.cells.items():
        declared = declared_outcome(entry) if "outcome" in entry else "pass"
        pinned = entry.get("target")
        judged = []
        for outcome, named, verdict in _measured(key, attack["target"], pinned):
            r = {"cell": key, "seed": 0, "attack": None if ":clean/" in key else attack, "verdict": verdict}
            j = e.judge(r)
            assert j.outcome == outcome, (entry, verdict)
            holds = outcome == declared and (pinned is None or named == pinned)
            expected = ("finding" if "outcome" in entry else "pass") if holds else "FAIL"
            assert j.judgement == expected, (entry, verdict, j)
            judged.append(j.judgement)
        assert "FAIL" in judged and ("finding" if "outcome" in entry else "pass") in judged, (entry, judged)  # can fail, can hold
    for key in [*e.attack, "z/fp32"]:  # an unlisted key gets meta's bounds
        b = e.attack_bounds(key)
        for kind in ("clean_acc", "asr"):
            assert b.get(f"min_{kind}", 0.0) <= b.get(f"max_{kind}", 1.0), (key, b)  # some measurement holds
        inside = [(b.get(f"min_{k}", 0.0) + b.get(f"max_{k}", 1.0)) / 2 for k in ("clean_acc", "asr")]
        assert e.check_attack(key, *inside) == [], (key, b)
        for clean_acc, asr in _beyond(e, key):
            assert e.check_attack(key, clean_acc, asr), (key, b, clean_acc, asr)
    for key, entry in e.audit.items():
        lo, hi = entry.get("min_quantized_fraction", 0.0), entry.get("max_quantized_fraction", 1.0)
        audit = {"input_gradient": entry.get("input_gradient", True), "quantized_param_fraction": (lo + hi) / 2, "gradient_note": ""}
        surrogate = entry.get("surrogate_gradient", True)
        assert e.check_audit(key, audit, surrogate) == [], entry
        for far in (lo - 0.01, hi + 0.01):
            if 0 <= far <= 1:
                assert e.check_audit(key, {**audit, "quantized_param_fraction": far}, surrogate), (entry, far)
        if "input_gradient" in entry:
            assert e.check_audit(key, {**audit, "input_gradient": not entry["input_gradient"]}, surrogate), entry
        if "surrogate_gradient" in entry:
            assert e.check_audit(key, audit, not surrogate), entry


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_as_expectations_is_refused_or_loaded(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("exp") / "exp.toml"
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(ConfigError):
        expectations.load(path)


_FINDING = '[cells."c/fp32/x[paper]"]\n'
MALFORMED_TABLES = {
    "meta-not-a-table": "meta = 1\n",  # AttributeError
    "not-utf8": b"\xff\xfe[meta]\n",  # UnicodeDecodeError
    "directory": None,  # IsADirectoryError
    "bound-not-a-number": "[audit.a]\nmin_quantized_fraction = 'x'\n",  # TypeError only when compared
    "bound-nan": "[audit.a]\nmin_quantized_fraction = nan\n",  # loads, and the bound never fails: silently off
    "bound-bool": "[audit.a]\nmax_quantized_fraction = true\n",  # a bool taken as the number 1
    "asr-bound-nan": "[attack.a]\nmax_asr = nan\nwhy = 'w'\n",
    "unknown-meta-key": "[meta]\ntolerence = 0.5\n",  # a typo silently leaves a default
    "old-format-status": _FINDING + "status = 'clean'\n",  # the old tables: refused, not read as the truth
    "finding-without-why": _FINDING + "outcome = 'miss'\n",
    "finding-with-proposed-why": _FINDING + f"outcome = 'miss'\nwhy = '{expectations_format.PROPOSED}: write it'\n",
    "crash-declared": _FINDING + "outcome = 'invalid'\nreason_code = 'error'\nwhy = 'w'\n",  # a crash is never expected
    "reason-code-not-a-str": _FINDING + "outcome = 'invalid'\nreason_code = 5\nwhy = 'w'\n",
    "reason-code-a-list": _FINDING + "outcome = 'invalid'\nreason_code = ['no-gradient']\nwhy = 'w'\n",  # TypeError: unhashable
    "false-alarm-on-a-backdoor": _FINDING + "outcome = 'false-alarm'\nwhy = 'w'\n",
    # naming the planted target is the truth: this finding could never hold
    "wrong-target-naming-the-target": _FINDING + "outcome = 'wrong-target'\ntarget = 0\nwhy = 'w'\n",
}


@pytest.mark.parametrize("content", list(MALFORMED_TABLES.values()), ids=list(MALFORMED_TABLES))
def test_a_malformed_expectations_file_is_a_config_error(tmp_path, content):
    path = tmp_path / "exp.toml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        expectations.load(path)
