"""The Result, typed: one cell's Result and its parts as frozen records (qbd.shapes), with
`to_dict` / `from_dict`. These classes are the one definition of the Result's JSON: the check qbd
runs on it (qbd.results.problems), the typed reading of a results file, and the JSON Schema
shipped as qbd/schema/result.schema.json (json_schema(); scripts/write_schema.py writes the file,
a test keeps it equal) all come from them. Torch-free.

The JSON is unchanged by the types: `Result.from_dict(r).to_dict() == r` for every Result qbd
writes; keys a record does not name are kept (`extra`), so a newer qbd or a third party may add some."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from qbd.outcomes import JUDGEMENTS
from qbd.reason_codes import INVALID_NEEDS_A_REASON, REASON, REASON_CODE, STATUS
from qbd.shapes import Absent, Record, Shape, When, entry, extra_keys

SCHEMA_VERSION = 1
WEIGHT_ORIGINS = ("trained", "fetched", "zoo")
CONTROLS = ("backdoored", "clean")
# dataset[:clean]/scheme/defense[protocol]: no part holds "/", "[", "]" or white space, and the data
# set no ":" (its ":clean" marks the control); as JSON Schema and Python's re both read it
CELL_ID_PATTERN = r"^([^/:\[\]\s]+)(:clean)?/([^/\[\]\s]+)/([^/\[\]\s]+)\[([^/\[\]\s]+)\]$"


class ResultError(ValueError):
    """A Result (or a results file) does not satisfy the contract."""


def cell_id(dataset: str, scheme: str, defense: str, protocol: str) -> str:
    """Test id of one matrix cell, e.g. synthetic/int8-dynamic/neural-cleanse[canonical]."""
    return f"{dataset}/{scheme}/{defense}[{protocol}]"


@dataclass(frozen=True, order=True)
class Cell:
    """One (dataset, scheme, defense, protocol) case; `control` "clean" marks the negative
    control (the same cell on a model trained without poisoning)."""

    dataset: str
    scheme: str
    defense: str
    protocol: str
    control: str = "backdoored"

    @property
    def id(self) -> str:
        ds = self.dataset if self.control == "backdoored" else f"{self.dataset}:clean"
        return cell_id(ds, self.scheme, self.defense, self.protocol)

    @property
    def row(self) -> str:
        """Its row's id: the cell id without ":clean" (a row covers both kinds of model)."""
        return cell_id(self.dataset, self.scheme, self.defense, self.protocol)

    @classmethod
    def parse(cls, text: str) -> Cell:
        """The cell of an id, "dataset[:clean]/scheme/defense[protocol]" (ValueError otherwise); a
        row id (no ":clean") parses as its backdoored cell."""
        m = re.match(CELL_ID_PATTERN, text) if isinstance(text, str) else None
        if not m:
            raise ValueError(f"not a cell id: {text!r}; expected dataset[:clean]/scheme/defense[protocol]")
        dataset, clean, scheme, defense, protocol = m.groups()
        return cls(dataset, scheme, defense, protocol, "clean" if clean else "backdoored")

    def to_dict(self) -> dict[str, str]:
        return {"dataset": self.dataset, "scheme": self.scheme, "defense": self.defense, "protocol": self.protocol,
                "control": self.control}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Cell:
        """The cell of its to_dict(); ValueError unless its id parses back to it."""
        if not isinstance(d, dict) or set(d) - {"control"} != {"dataset", "scheme", "defense", "protocol"}:
            raise ValueError(f"a cell is an object with dataset, scheme, defense, protocol (and control), got {d!r}")
        if d.get("control", "backdoored") not in CONTROLS:
            raise ValueError(f"a cell's control is one of {', '.join(CONTROLS)}, got {d['control']!r}")
        cell = cls(**d)
        try:
            back = cls.parse(cell.id)
        except ValueError:
            back = None
        if back != cell:
            raise ValueError(f"not a cell: {d!r} (a part holds '/', '[', ']', ':' or white space)")
        return cell


class Part(Record):
    """A part of a Result: its problems raise ResultError."""

    error = ResultError


FRACTION = Shape(("number",), minimum=0, maximum=1, name="fraction")
STRING = Shape(("string",))
NAME = Shape(("string",), min_length=1)
OPT_STRING = Shape(("string", "null"))
BOOL = Shape(("boolean",))
OPT_BOOL = Shape(("boolean", "null"))
COUNT = Shape(("integer",), minimum=0)
OPT_INT = Shape(("integer", "null"))
OPT_NUMBER = Shape(("number", "null"))
CLASS = Shape(("integer", "null"), minimum=0)


@dataclass(frozen=True, kw_only=True)
class Weights(Part):
    """where the weights came from: trained by qbd, fetched (untrusted, pinned by sha256) or the pinned zoo"""

    origin: str = entry(Shape(enum=WEIGHT_ORIGINS))
    sha256: str | Absent = entry(STRING, optional=True)
    store_key: str | Absent = entry(STRING, optional=True)
    extra: dict[str, Any] = extra_keys()
    rules = (When("origin", ("fetched", "zoo"), require=("sha256",), lacks="{origin} weights must record their sha256"),)


@dataclass(frozen=True, kw_only=True)
class AttackPart(Part):
    """the attack planted in the model (qbd.config.AttackSpec's fields and its seed)"""

    name: str = entry(STRING)
    target: int = entry(COUNT)
    trigger_pattern: str = entry(STRING)
    trigger_size: int = entry(Shape(("integer",), minimum=1))
    trigger_position: str = entry(STRING)
    poison_rate: float = entry(Shape(("number",), exclusive_minimum=0, maximum=1))
    seed: int | Absent = entry(COUNT, optional=True)
    alpha: float | Absent = entry(Shape(("number",), minimum=0, maximum=1), optional=True)
    scheme: str | Absent = entry(STRING, optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "attack"


@dataclass(frozen=True, kw_only=True)
class SurrogateAgreement(Part):
    """surrogate vs deployed logits on the calibration images, measured at apply time"""

    data: str | Absent = entry(STRING, optional=True)
    n_images: int | Absent = entry(COUNT, optional=True)
    runtime_batch: int | Absent = entry(Shape(("integer",), minimum=1), optional=True)
    max_abs_logit_delta: float | Absent | None = entry(OPT_NUMBER, optional=True)
    max_abs_runtime_logit: float | Absent | None = entry(OPT_NUMBER, optional=True)
    max_rel_logit_delta: float | Absent | None = entry(OPT_NUMBER, optional=True)
    top1_agreement: float | Absent = entry(FRACTION, optional=True)
    rel_tolerance: float | Absent | None = entry(OPT_NUMBER, optional=True)
    within_tolerance: bool | Absent | None = entry(OPT_BOOL, optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "surrogate_agreement"


@dataclass(frozen=True)
class Audit(Part):
    """What a scheme really did to a model; measured, not declared. A results file written before
    a field existed may lack it: only differentiable, input_gradient, engine and
    quantized_param_fraction are required in the JSON.

    qbd.quant.base re-exports it for scheme authors, who give every field (`given`)."""

    scheme: str = entry(Shape(("string",), doc="the scheme that deployed the model"), optional=True, given=True)
    differentiable: bool = entry(Shape(("boolean",), doc="the scheme's claim about the deployed model"))
    input_gradient: bool = entry(Shape(("boolean",), doc="measured: a backward pass delivered a finite, non-zero input gradient"))
    gradient_note: str | None = entry(Shape(("string", "null"), doc="why not, or the warning torch raised during the probe"),
                                      optional=True, given=True)
    engine: str | None = entry(Shape(("string", "null"), doc="the quantized engine or kernel family that ran the integer ops"))
    backend: str = entry(Shape(("string",), doc="the quantization flow that produced the deployed model"), optional=True, given=True)
    bits: int | None = entry(Shape(("integer", "null"), doc="the weights' bit width; null for fp32"), optional=True, given=True)
    quantized_modules: list[str] = entry(Shape(("array",), items=STRING, doc=(
        "the modules whose weights are stored as integers (or, simulated, on an integer grid), e.g. features.3.conv1")),
        optional=True, given=True)
    quantized_params: int = entry(Shape(("integer",), minimum=0, doc="the weights those modules hold"), optional=True, given=True)
    total_params: int = entry(Shape(("integer",), minimum=0, doc=(
        "every floating-point tensor element of the FP32 model's state dict: conv and linear weights and biases, BatchNorm"
        " weights, biases and running statistics, the Normalize mean and std")), optional=True, given=True)
    quantized_param_fraction: float = entry(dataclasses.replace(FRACTION, doc=(
        "quantized_params / total_params (BatchNorm folded into a quantized conv counts as not quantized)")))
    max_levels_per_channel: int | None = entry(Shape(("integer", "null"), doc="most distinct integer levels in one output channel"),
                                               optional=True, given=True)
    max_rel_error: float | None = entry(Shape(("number", "null"), doc="max |w - Q(w)| / scale over all quantized weights"),
                                        optional=True, given=True)
    model_bytes: int = entry(Shape(("integer",), minimum=0, doc="the deployed artefact's size: its state dict saved, or the ONNX file"),
                             optional=True, given=True)
    surrogate_rel_tolerance: float | None = entry(Shape(("number", "null"), doc=(
        "the stated bound on max |surrogate logits - deployed logits| / max |deployed logits|; null where the surrogate is the"
        " deployed model itself")), optional=True, default=None)
    kernel_ops: dict[str, int] = entry(Shape(("object",), values=Shape(("integer",)), doc="quantized op or module -> count"),
                                       optional=True, factory=dict)
    surrogate_agreement: dict[str, Any] | None = entry(Shape(("object", "null"), record=SurrogateAgreement, as_dict=True, doc=(
        "measured at apply time; null where not measured (a scheme whose surrogate is the deployed model)")),
        optional=True, default=None)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class Quant(Part):
    """the scheme the model was deployed through, and its audit"""

    scheme: str = entry(STRING)
    audit: Audit = entry(Shape(record=Audit))
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class Placement(Part):
    """where the deployed model and its surrogate ran; note says why the deployed model is not on the run's device"""

    device: str = entry(STRING)
    deployed: str = entry(STRING)
    surrogate: str = entry(STRING)
    note: str | Absent = entry(STRING, optional=True)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class Distribution(Part):
    """the installed distribution that provides a defense (pytest-qbd for the built-ins)"""

    name: str = entry(STRING)
    version: str = entry(STRING)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class DefensePart(Part):
    """the defense that judged the model, as it ran"""

    name: str = entry(NAME)
    protocol: str = entry(Shape(("string",), doc="paper or canonical (qbd.config.PROTOCOLS)"))
    gradient_path: str | Absent = entry(Shape(enum=("deployed", "surrogate")), optional=True)
    params: dict[str, Any] = entry(Shape(("object",), doc="the hyperparameters the defense used"))
    distribution: Distribution | Absent | None = entry(Shape(("object", "null"), record=Distribution, doc="null for a module no distribution installed"),
                                            optional=True)
    input_unchanged: bool | Absent | None = entry(Shape(("boolean", "null"), doc=(
        "for a defense that reads one layer's activations (AC, SS): whether the scheme leaves them bit-identical to fp32's"
        " on the calibration images (the cell then repeats fp32); null where not measured")), optional=True)
    names_target: bool | Absent = entry(Shape(("boolean",), doc="false for a defense that names no target class (a detection then need"
                                                    " not name one)"), optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "defense"


@dataclass(frozen=True, kw_only=True)
class ControlPart(Part):
    """a named check that the cell could have fired: passed or not, with a figure"""

    passed: bool = entry(BOOL)
    value: float | None = entry(OPT_NUMBER)
    detail: str = entry(STRING)
    extra: dict[str, Any] = extra_keys()
    schema_name = "control"


@dataclass(frozen=True, kw_only=True)
class VerdictPart(Part):
    """the defense's verdict (qbd.defenses.base.Verdict, as JSON)"""

    status: str = entry(STATUS)
    score: float | None = entry(OPT_NUMBER)
    threshold: float | None = entry(OPT_NUMBER)
    target_class: int | None = entry(CLASS)
    reason: str | None = entry(REASON)
    reason_code: str | None = entry(REASON_CODE)
    evidence: dict[str, Any] = entry(Shape(("object",), doc="the defense's own figures; a crash's traceback under \"traceback\""))
    controls: dict[str, ControlPart] = entry(Shape(("object",), values=Shape(record=ControlPart)))
    extra: dict[str, Any] = extra_keys()
    rules = (INVALID_NEEDS_A_REASON,)
    schema_name = "verdict"


@dataclass(frozen=True, kw_only=True)
class TruthPart(Part):
    """the ground truth the defense never saw"""

    backdoored: bool = entry(BOOL)
    target: int | None = entry(CLASS)
    target_named: bool | Absent | None = entry(OPT_BOOL, optional=True)
    backdoor: str | Absent | None = entry(Shape(enum=("active", "dormant", None), doc=(
        "whether this model (as deployed) obeys the trigger: active (ASR >= 0.5) or dormant (a quant-conditioned backdoor"
        " whose ASR here is at most its gate's 10 %); null for a clean model or in between")), optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "truth"


@dataclass(frozen=True, kw_only=True)
class Versions(Part):
    """the versions the cell ran with, and torch's thread count"""

    qbd: str | Absent = entry(STRING, optional=True)
    torch: str | Absent = entry(STRING, optional=True)
    torchvision: str | Absent = entry(STRING, optional=True)
    torch_threads: int | Absent = entry(Shape(("integer",), minimum=1), optional=True)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class MemoPart(Part):
    """set where the run memoises Results (qbd.memo): the content key, whether this Result was reused rather than
    computed, the session that computed it, and whether it was filed (an invalid Result never is)"""

    key: str = entry(Shape(("string",), pattern="^[0-9a-f]{64}$"))
    reused: bool = entry(BOOL)
    session: str = entry(NAME)
    filed: bool | Absent = entry(BOOL, optional=True)
    closed = True
    schema_name = "memo"


@dataclass(frozen=True, kw_only=True)
class JudgementPart(Part):
    """the outcome against the truth and the judgement against the expectations (qbd.outcomes)"""

    outcome: str = entry(STRING)
    judgement: str = entry(Shape(enum=JUDGEMENTS))
    expected: str | Absent = entry(STRING, optional=True)
    why: str | Absent | None = entry(OPT_STRING, optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "judgement"


@dataclass(frozen=True, kw_only=True)
class Result(Part):
    """One cell's Result, as qbd.evaluate.Bench.run produces it: a defense's verdict on one model (backdoored, or
    clean when attack is null) deployed through one quantization scheme. A results file (results.json, `qbd run
    --json`) is {"schema": 1, "results": [Result, ...], "rows": [row, ...], "effects": [effect, ...], "run": {...}}.
    Other keys are allowed, so that a newer qbd or a third party may add some."""

    cell: str = entry(Shape(("string",), pattern=CELL_ID_PATTERN, doc="dataset[:clean]/scheme/defense[protocol], e.g. digits/int8-dynamic/strip[paper]"))
    dataset: str = entry(NAME)
    model: str = entry(Shape(("string",), doc="the architecture, e.g. tiny-cnn"))
    weights: Weights | Absent | None = entry(Shape(("object", "null"), record=Weights, doc="null when not known"), optional=True)
    seed: int = entry(Shape(("integer",), minimum=0, doc="the model seed (the defense's generator is seeded with it too)"))
    tier: str | Absent = entry(Shape(("string",), doc="the settings tier (smoke, paper)"), optional=True)
    attack: AttackPart | None = entry(Shape(("object", "null"), record=AttackPart, doc="null: a clean model"))
    quant: Quant = entry(Shape(record=Quant))
    placement: Placement | Absent = entry(Shape(record=Placement), optional=True)
    defense: DefensePart = entry(Shape(record=DefensePart))
    verdict: VerdictPart = entry(Shape(record=VerdictPart))
    clean_acc: float = entry(dataclasses.replace(FRACTION, doc="clean accuracy of the deployed model on the evaluation split"))
    asr: float | None = entry(Shape(("number", "null"), minimum=0, maximum=1, doc=(
        "attack success rate of the deployed model (the probe trigger's for a clean model)")))
    truth: TruthPart | Absent = entry(Shape(record=TruthPart), optional=True)
    seconds: float = entry(Shape(("number",), minimum=0))
    versions: Versions = entry(Shape(record=Versions))
    memo: MemoPart | Absent = entry(Shape(record=MemoPart), optional=True)
    judgement: JudgementPart | Absent | None = entry(Shape(("object", "null"), record=JudgementPart), optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "result"

    @classmethod
    def label(cls, obj: Any) -> str:
        return f"Result {obj.get('cell', '?') if isinstance(obj, dict) else '?'}"

    @property
    def cell_id(self) -> Cell:
        """The cell as a Cell (its data set, scheme, defense, protocol and control)."""
        return Cell.parse(self.cell)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one Result, from the types above."""
    defs: dict[str, Any] = {}
    body = Result.json_schema(defs)
    defs.pop("result", None)
    Shape(record=Effect).json_schema(defs)  # files the results file's "effects" entries too, for readers of the whole file
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"urn:qbd:schema:result:{SCHEMA_VERSION}",
            "title": "qbd Result", **body, "$defs": dict(sorted(defs.items()))}


CI = Shape(("array",), items=FRACTION, min_items=2, max_items=2, doc="Wilson 95 %")


@dataclass(frozen=True, kw_only=True)
class Paired(Part):
    """one side of an effect: the same models' rate on the baseline and on the scheme, with the exact McNemar test"""

    n: int = entry(Shape(("integer",), minimum=1, doc="models with an answer (not invalid) on both schemes"))
    baseline_count: int = entry(COUNT)
    scheme_count: int = entry(COUNT)
    baseline_rate: float = entry(FRACTION)
    scheme_rate: float = entry(FRACTION)
    baseline_ci: tuple[float, float] = entry(CI)
    scheme_ci: tuple[float, float] = entry(CI)
    change: float = entry(Shape(("number",), minimum=-1, maximum=1, doc="scheme_rate - baseline_rate"))
    lost: int = entry(Shape(("integer",), minimum=0, doc="flagged on the baseline only"))
    gained: int = entry(Shape(("integer",), minimum=0, doc="flagged on the scheme only"))
    p: float = entry(Shape(("number",), minimum=0, maximum=1, doc=(
        "exact McNemar: 2 x P(Binomial(lost + gained, 1/2) <= min(lost, gained)), at most 1")))
    p_holm: float = entry(Shape(("number",), minimum=0, maximum=1, doc="p, Holm-adjusted over every side of every effect of the run"))
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class InvalidPairs(Part):
    """invalid verdicts on the baseline, on the scheme, and the pairs left out for them"""

    baseline: int = entry(COUNT)
    scheme: int = entry(COUNT)
    pairs_left_out: int = entry(COUNT)
    closed = True
    schema_name = "invalid_pairs"


@dataclass(frozen=True, kw_only=True)
class Effect(Part):
    """a results file's "effects" entries (qbd.effects): quantization's effect on one (data set, defense, protocol)
    against fp32, paired on the same models, with the exact McNemar p-value"""

    effect: str = entry(Shape(("string",), doc="dataset/scheme/defense[protocol]"))
    dataset: str = entry(STRING)
    scheme: str = entry(STRING)
    baseline: str = entry(Shape(("string",), doc="the unquantized scheme every other is paired with (fp32)"))
    defense: str = entry(STRING)
    protocol: str = entry(STRING)
    input_unchanged: bool | Absent | None = entry(Shape(("boolean", "null"), doc=(
        "the scheme leaves the layer the defense reads bit-identical to fp32's: the effect compares fp32 with itself")))
    invalid: dict[str, InvalidPairs] = entry(Shape(("object",), values=Shape(record=InvalidPairs), doc="per side"))
    detection: Paired | None = entry(Shape(("object", "null"), record=Paired, doc=(
        "backdoored models: detected naming the planted target; null when no pair had an answer on both sides")))
    false_alarm: Paired | None = entry(Shape(("object", "null"), record=Paired, doc="clean models: detected"))
    extra: dict[str, Any] = extra_keys()
