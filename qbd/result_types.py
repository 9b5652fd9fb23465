"""The Result, typed: one cell's Result and its parts as frozen records (qbd.shapes), with
`to_dict` / `from_dict`. These classes are the one definition of the Result's JSON: the check qbd
runs on it (qbd.results.problems), the typed reading of a results file, and the JSON Schema
shipped as qbd/schema/result.schema.json (json_schema(); scripts/write_schema.py writes the file,
a test keeps it equal) all come from them. Torch-free.

The JSON is unchanged by the types: `Result.from_dict(r).to_dict() == r` for every Result qbd
writes; keys a record does not name are kept (`extra`), so a newer qbd or a third party may add some."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbd.outcomes import JUDGEMENTS
from qbd.reason_codes import INVALID_NEEDS_A_REASON, REASON, REASON_CODE, STATUS
from qbd.shapes import Record, Shape, When, entry, extra_keys

SCHEMA_VERSION = 1
WEIGHT_ORIGINS = ("trained", "fetched", "zoo")

FRACTION = Shape(("number",), minimum=0, maximum=1, name="fraction")
STRING = Shape(("string",))
NAME = Shape(("string",), min_length=1)
OPT_STRING = Shape(("string", "null"))
BOOL = Shape(("boolean",))
OPT_BOOL = Shape(("boolean", "null"))
COUNT = Shape(("integer",), minimum=0)
OPT_INT = Shape(("integer", "null"))
OPT_NUMBER = Shape(("number", "null"))
OBJECT = Shape(("object",))
CLASS = Shape(("integer", "null"), minimum=0)


@dataclass(frozen=True, kw_only=True)
class Weights(Record):
    """where the weights came from: trained by qbd, fetched (untrusted, pinned by sha256) or the pinned zoo"""

    origin: str = entry(Shape(enum=WEIGHT_ORIGINS))
    sha256: str = entry(STRING, optional=True)
    store_key: str = entry(STRING, optional=True)
    extra: dict[str, Any] = extra_keys()
    rules = (When("origin", ("fetched", "zoo"), require=("sha256",), lacks="{origin} weights must record their sha256"),)


@dataclass(frozen=True, kw_only=True)
class AttackPart(Record):
    """the attack planted in the model (qbd.config.AttackSpec's fields and its seed)"""

    name: str = entry(STRING)
    target: int = entry(COUNT)
    trigger_pattern: str = entry(STRING)
    trigger_size: int = entry(Shape(("integer",), minimum=1))
    trigger_position: str = entry(STRING)
    poison_rate: float = entry(Shape(("number",), exclusive_minimum=0, maximum=1))
    seed: int = entry(COUNT, optional=True)
    alpha: float = entry(Shape(("number",), minimum=0, maximum=1), optional=True)
    scheme: str = entry(STRING, optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "attack"


@dataclass(frozen=True, kw_only=True)
class SurrogateAgreement(Record):
    """surrogate vs deployed logits on the calibration images, measured at apply time"""

    data: str = entry(STRING, optional=True)
    n_images: int = entry(COUNT, optional=True)
    runtime_batch: int = entry(Shape(("integer",), minimum=1), optional=True)
    max_abs_logit_delta: float | None = entry(OPT_NUMBER, optional=True)
    max_abs_runtime_logit: float | None = entry(OPT_NUMBER, optional=True)
    max_rel_logit_delta: float | None = entry(OPT_NUMBER, optional=True)
    top1_agreement: float = entry(FRACTION, optional=True)
    rel_tolerance: float | None = entry(OPT_NUMBER, optional=True)
    within_tolerance: bool = entry(BOOL, optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "surrogate_agreement"


@dataclass(frozen=True)
class Audit(Record):
    """What a scheme really did to a model; measured, not declared (qbd.quant.base re-exports it).

    quantized_param_fraction = quantized_params / total_params, where total_params counts every
    floating-point tensor of the FP32 model's state dict (conv and linear weights and biases,
    BatchNorm weights, biases and running statistics, the Normalize mean and std) and
    quantized_params counts the weights that the deployed model stores as integers (or, for
    simulated schemes, on an integer grid). BatchNorm folded into a quantized conv counts as
    not quantized.

    A results file written before a field existed may lack it: only the four measured facts every
    reader needs are required in the JSON; a scheme always gives them all."""

    scheme: str = entry(STRING, optional=True, given=True)
    differentiable: bool = entry(BOOL)  # the scheme's claim about the deployed model
    input_gradient: bool = entry(BOOL)  # measured: a backward pass delivered a finite, non-zero input grad
    gradient_note: str | None = entry(OPT_STRING, optional=True, given=True)  # why not, or the warning torch raised during the probe
    engine: str | None = entry(OPT_STRING)  # quantized engine / kernel family that ran the int8 ops
    backend: str = entry(STRING, optional=True, given=True)  # which quantization flow produced the deployed model
    bits: int | None = entry(OPT_INT, optional=True, given=True)
    quantized_modules: list[str] = entry(Shape(("array",), items=STRING), optional=True, given=True)  # names in the Classifier
    quantized_params: int = entry(COUNT, optional=True, given=True)
    total_params: int = entry(COUNT, optional=True, given=True)
    quantized_param_fraction: float = entry(FRACTION)
    max_levels_per_channel: int | None = entry(OPT_INT, optional=True, given=True)  # most distinct integer levels in one output channel
    max_rel_error: float | None = entry(OPT_NUMBER, optional=True, given=True)  # max |w - Q(w)| / scale over all quantized weights
    model_bytes: int = entry(COUNT, optional=True, given=True)  # torch.save(deployed.state_dict()) into a BytesIO
    # Stated bound on max |surrogate logits - deployed logits| / max |deployed logits|; None where
    # the surrogate is the deployed model itself.
    surrogate_rel_tolerance: float | None = entry(OPT_NUMBER, optional=True, default=None)
    kernel_ops: dict[str, int] = entry(Shape(("object",), values=Shape(("integer",))), optional=True, factory=dict)  # quantized op -> count
    # measured at apply time on the calibration images; None where not measured (a scheme whose
    # surrogate is the deployed model, or one that does not measure it)
    surrogate_agreement: Any = entry(Shape(("object", "null"), record=SurrogateAgreement), optional=True, default=None)


@dataclass(frozen=True, kw_only=True)
class Quant(Record):
    """the scheme the model was deployed through, and its audit"""

    scheme: str = entry(STRING)
    audit: Audit = entry(Shape(record=Audit))
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class Placement(Record):
    """where the deployed model and its surrogate ran; note says why the deployed model is not on the run's device"""

    device: str = entry(STRING)
    deployed: str = entry(STRING)
    surrogate: str = entry(STRING)
    note: str = entry(STRING, optional=True)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class Distribution(Record):
    """the installed distribution that provides a defense (pytest-qbd for the built-ins)"""

    name: str = entry(STRING)
    version: str = entry(STRING)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class DefensePart(Record):
    """the defense that judged the model, as it ran"""

    name: str = entry(NAME)
    protocol: str = entry(STRING, )
    gradient_path: str = entry(Shape(enum=("deployed", "surrogate")), optional=True)
    params: dict[str, Any] = entry(Shape(("object",), doc="the hyperparameters the defense used"))
    distribution: Distribution | None = entry(Shape(("object", "null"), record=Distribution, doc="null for a module no distribution installed"),
                                            optional=True)
    input_unchanged: bool | None = entry(Shape(("boolean", "null"), doc=(
        "for a defense that reads one layer's activations (AC, SS): whether the scheme leaves them bit-identical to fp32's"
        " on the calibration images (the cell then repeats fp32); null where not measured")), optional=True)
    names_target: bool = entry(Shape(("boolean",), doc="false for a defense that names no target class (a detection then need"
                                                    " not name one)"), optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "defense"


@dataclass(frozen=True, kw_only=True)
class ControlPart(Record):
    """a named check that the cell could have fired: passed or not, with a figure"""

    passed: bool = entry(BOOL)
    value: float | None = entry(OPT_NUMBER)
    detail: str = entry(STRING)
    extra: dict[str, Any] = extra_keys()
    schema_name = "control"


@dataclass(frozen=True, kw_only=True)
class VerdictPart(Record):
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
class TruthPart(Record):
    """the ground truth the defense never saw"""

    backdoored: bool = entry(BOOL)
    target: int | None = entry(CLASS)
    target_named: bool | None = entry(OPT_BOOL, optional=True)
    backdoor: str | None = entry(Shape(enum=("active", "dormant", None), doc=(
        "whether this model (as deployed) obeys the trigger: active (ASR >= 0.5) or dormant (a quant-conditioned backdoor"
        " whose ASR here is at most its gate's 10 %); null for a clean model or in between")), optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "truth"


@dataclass(frozen=True, kw_only=True)
class Versions(Record):
    """the versions the cell ran with, and torch's thread count"""

    qbd: str = entry(STRING, optional=True)
    torch: str = entry(STRING, optional=True)
    torchvision: str = entry(STRING, optional=True)
    torch_threads: int = entry(Shape(("integer",), minimum=1), optional=True)
    extra: dict[str, Any] = extra_keys()


@dataclass(frozen=True, kw_only=True)
class MemoPart(Record):
    """set where the run memoises Results (qbd.memo): the content key, whether this Result was reused rather than
    computed, the session that computed it, and whether it was filed (an invalid Result never is)"""

    key: str = entry(Shape(("string",), pattern="^[0-9a-f]{64}$"))
    reused: bool = entry(BOOL)
    session: str = entry(NAME)
    filed: bool = entry(BOOL, optional=True)
    closed = True
    schema_name = "memo"


@dataclass(frozen=True, kw_only=True)
class JudgementPart(Record):
    """the outcome against the truth and the judgement against the expectations (qbd.outcomes)"""

    outcome: str = entry(STRING)
    judgement: str = entry(Shape(enum=JUDGEMENTS))
    expected: str = entry(STRING, optional=True)
    why: str | None = entry(OPT_STRING, optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "judgement"


@dataclass(frozen=True, kw_only=True)
class Result(Record):
    """One cell's Result, as qbd.evaluate.Bench.run produces it: a defense's verdict on one model (backdoored, or
    clean when attack is null) deployed through one quantization scheme. A results file (results.json, `qbd run
    --json`) is {"schema": 1, "results": [Result, ...], "rows": [row, ...], "effects": [effect, ...], "run": {...}}.
    Other keys are allowed, so that a newer qbd or a third party may add some."""

    cell: str = entry(Shape(("string",), min_length=1, doc="dataset[:clean]/scheme/defense[protocol], e.g. digits/int8-dynamic/strip[paper]"))
    dataset: str = entry(NAME)
    model: str = entry(Shape(("string",), doc="the architecture, e.g. tiny-cnn"))
    weights: Weights | None = entry(Shape(("object", "null"), record=Weights, doc="null when not known"), optional=True)
    seed: int = entry(Shape(("integer",), minimum=0, doc="the model seed (the defense's generator is seeded with it too)"))
    tier: str = entry(Shape(("string",), doc="the settings tier (smoke, paper)"), optional=True)
    attack: AttackPart | None = entry(Shape(("object", "null"), record=AttackPart, doc="null: a clean model"))
    quant: Quant = entry(Shape(record=Quant))
    placement: Placement = entry(Shape(record=Placement), optional=True)
    defense: DefensePart = entry(Shape(record=DefensePart))
    verdict: VerdictPart = entry(Shape(record=VerdictPart))
    clean_acc: float = entry(Shape(("number",), minimum=0, maximum=1, name="fraction",
                                 doc="clean accuracy of the deployed model on the evaluation split"))
    asr: float | None = entry(Shape(("number", "null"), minimum=0, maximum=1, doc=(
        "attack success rate of the deployed model (the probe trigger's for a clean model)")))
    truth: TruthPart = entry(Shape(record=TruthPart), optional=True)
    seconds: float = entry(Shape(("number",), minimum=0))
    versions: Versions = entry(Shape(record=Versions))
    memo: MemoPart = entry(Shape(record=MemoPart), optional=True)
    judgement: JudgementPart | None = entry(Shape(("object", "null"), record=JudgementPart), optional=True)
    extra: dict[str, Any] = extra_keys()
    schema_name = "result"

    @property
    def cell_id(self) -> Any:
        """The cell as a qbd.tiers.Cell (its data set, scheme, defense, protocol and control)."""
        from qbd.tiers import Cell

        return Cell.parse(self.cell)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one Result, from the types above."""
    defs: dict[str, Any] = {}
    body = Result.json_schema(defs)
    defs.pop("result", None)
    for part in (Effect,):  # the results file's other entries, for readers of the whole file
        part_schema = Shape(record=part).json_schema(defs)
        assert part_schema["$ref"].endswith(part.record_name())
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"urn:qbd:schema:result:{SCHEMA_VERSION}",
            "title": "qbd Result", **body, "$defs": dict(sorted(defs.items()))}


CI = Shape(("array",), items=FRACTION, min_items=2, max_items=2, doc="Wilson 95 %")


@dataclass(frozen=True, kw_only=True)
class Paired(Record):
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
class InvalidPairs(Record):
    """invalid verdicts on the baseline, on the scheme, and the pairs left out for them"""

    baseline: int = entry(COUNT)
    scheme: int = entry(COUNT)
    pairs_left_out: int = entry(COUNT)
    closed = True
    schema_name = "invalid_pairs"


@dataclass(frozen=True, kw_only=True)
class Effect(Record):
    """a results file's "effects" entries (qbd.effects): quantization's effect on one (data set, defense, protocol)
    against fp32, paired on the same models, with the exact McNemar p-value"""

    effect: str = entry(Shape(("string",), doc="dataset/scheme/defense[protocol]"))
    dataset: str = entry(STRING)
    scheme: str = entry(STRING)
    baseline: str = entry(Shape(("string",), doc="the unquantized scheme every other is paired with (fp32)"))
    defense: str = entry(STRING)
    protocol: str = entry(STRING)
    input_unchanged: bool | None = entry(Shape(("boolean", "null"), doc=(
        "the scheme leaves the layer the defense reads bit-identical to fp32's: the effect compares fp32 with itself")))
    invalid: dict[str, InvalidPairs] = entry(Shape(("object",), values=Shape(record=InvalidPairs), doc="per side"))
    detection: Paired | None = entry(Shape(("object", "null"), record=Paired, doc=(
        "backdoored models: detected naming the planted target; null when no pair had an answer on both sides")))
    false_alarm: Paired | None = entry(Shape(("object", "null"), record=Paired, doc="clean models: detected"))
    extra: dict[str, Any] = extra_keys()
