"""The pinned model zoo: trained weights committed with the repository and shipped in the package
(qbd/zoo/weights/), so every machine evaluates the same models.

Training on CPU is bitwise reproducible on one machine, not across CPUs (an Intel and an AMD
machine reduce floats differently), so a suite that trains its own models judges different
weights on each machine of a CI fleet. The zoo pins them: `qbd zoo build` trains the smoke
tier's models once, writes them as safetensors, and records for each, in manifest.json, its
sha256, training job, recipe key, clean accuracy, ASR, torch version and CPU. `qbd.trained.get_trained`
looks here before the store; every file is sha256-verified on every load.

Layout:
    qbd/zoo/weights/manifest.json
    qbd/zoo/weights/<dataset>-<attack>-s<seed>.safetensors

$QBD_ZOO names another zoo directory; `QBD_ZOO=off` disables the zoo (everything is trained).
Torch-free except `load`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbd.config import TRAINING_REVISION, AttackSpec, ModelJob, canonical_json, sha256_text
from qbd.errors import ConfigError

ZOO_ENV = "QBD_ZOO"
MANIFEST = "manifest.json"
FORMAT = 1
DEFAULT_DIR = Path(__file__).resolve().parent / "weights"  # inside the package: a wheel carries it
EVAL_SEEDS = tuple(range(10))  # evaluation models: rows over models are measured on these (ten per data set and kind)
CALIBRATION_SEEDS = (100, 101, 102, 103, 104)  # thresholds are calibrated on these only (scripts/calibrate.py)
OTHER_ATTACK_SEEDS = tuple(range(5))  # the other attacks' rows (blend, quant-conditioned) are measured on these
# quant-conditioned on int8-static: the models its rows are measured on, per data set, are the first
# five that pass the construction's own gate (qbd.config.QC_GATES); it misses on digits seed 2 (does
# not wake: ASR 0.89), synthetic seed 3 (not dormant: FP32 ASR 0.33) and synthetic seed 5 (clean
# accuracy drop 0.031), which are not pinned: a model that fails its attack's gate is not that attack
QC_INT8_SEEDS = {"digits": (0, 1, 3, 4, 5), "synthetic": (0, 1, 2, 4, 6)}
SPREAD_SEEDS = tuple(range(5))  # the rows of the attack settings beyond the calibration attack (qbd.presets.SPREAD_ATTACKS)
# Their gate: a working backdoor, an ASR of at least 0.5 (where qbd calls a backdoor active). Not
# the Phase-1 gate's 0.95: that holds the calibration attack to the paper's recipe, and a user's
# weaker attack is still an attack (synthetic at 1 % poison: ASR 0.87 to 0.96 over the five models).
SPREAD_MIN_ASR = 0.5
# A setting that does not take on a data set is not pinned there: at 1 % poison the digits patch
# reaches an ASR of 0.00 to 0.07 on all five models, so there is no backdoor to detect (a model
# that fails its attack's gate is not that attack)
SPREAD_UNTAKEN = {"digits": ("badnet-1pct",)}


def recipe_key(job: ModelJob, data_fingerprint: str) -> str:
    """What pins a zoo model: the training job, the training code's revision and the exact data.
    Unlike the store key, not the qbd version: a release must not orphan the pinned weights."""
    return sha256_text(canonical_json({"job": job.to_dict(), "revision": TRAINING_REVISION, "data": data_fingerprint}))


def file_name(job: ModelJob) -> str:
    a = job.attack
    kind = "clean" if a is None else f"{a.label()}-a{a.seed}"
    return f"{job.dataset.name}-{job.model.name}-{kind}-s{job.train.seed}.safetensors"


def zoo_jobs(datasets: tuple[str, ...] = ("digits", "synthetic"), model: str = "tiny-cnn") -> list[ModelJob]:
    """Every model the smoke tier evaluates: per data set, a backdoored (default BadNet) and a
    clean model for each evaluation and calibration seed; and the other attacks, the models their rows are measured on: blend and quant-conditioned on int4-sim
    on OTHER_ATTACK_SEEDS, quant-conditioned on int8-static on QC_INT8_SEEDS; the attack settings
    beyond the calibration attack on SPREAD_SEEDS (those that take on the data set)."""
    from qbd.presets import BLEND_ATTACK, QC_ATTACK, QC_INT8_ATTACK, SPREAD_ATTACKS, seeded_job

    jobs = []
    for ds in datasets:
        for seed in (*EVAL_SEEDS, *CALIBRATION_SEEDS):
            jobs += [seeded_job(ds, model, seed, AttackSpec()), seeded_job(ds, model, seed, None)]
        jobs += [seeded_job(ds, model, s, a) for a in (BLEND_ATTACK, QC_ATTACK) for s in OTHER_ATTACK_SEEDS]
        jobs += [seeded_job(ds, model, s, QC_INT8_ATTACK) for s in QC_INT8_SEEDS[ds]]
        jobs += [seeded_job(ds, model, s, a) for name, a in SPREAD_ATTACKS.items() if name not in SPREAD_UNTAKEN.get(ds, ())
                 for s in SPREAD_SEEDS]
    return jobs


def cpu_name() -> str:
    """The CPU model, for the manifest (trained weights differ between CPU families)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Pinned:
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.record["sha256"])

    def provenance(self) -> dict[str, Any]:
        """For every Result: which file, verified against which sha256, from which zoo (the
        repository's, or a $QBD_ZOO directory, whose manifest vouches for itself)."""
        return {"origin": "zoo", "zoo_key": self.key, "file": self.path.name, "sha256": self.sha256,
                "zoo": str(self.path.parent), "repository_zoo": self.path.parent.resolve() == DEFAULT_DIR.resolve(),
                "trained_on": self.record.get("cpu"), "torch": self.record.get("torch")}


class Zoo:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"format": FORMAT, "models": {}}
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"zoo manifest {path}: unreadable: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("models"), dict):
            raise ConfigError(f"zoo manifest {path}: not a format-{FORMAT} qbd zoo manifest")
        for key, rec in doc["models"].items():
            name = rec.get("file") if isinstance(rec, dict) else None
            # a bare file name inside the zoo: a manifest must not point a load (or a hash) elsewhere
            if not (isinstance(name, str) and name == Path(name).name and name.endswith(".safetensors") and not name.startswith(".")):
                raise ConfigError(f"zoo manifest {path}: model {key[:12]}...: 'file' must be a bare *.safetensors name, got {name!r}")
            missing = {"sha256", "clean_acc", "asr"} - set(rec)
            if missing:
                raise ConfigError(f"zoo manifest {path}: model {key[:12]}... lacks {sorted(missing)}")
        return doc

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.manifest["models"]

    def find(self, job: ModelJob, data_fingerprint: str) -> Pinned | None:
        key = recipe_key(job, data_fingerprint)
        rec = self.models.get(key)
        return None if rec is None else Pinned(key, self.root / rec["file"], rec)

    def load(self, pinned: Pinned) -> dict[str, Any]:
        """The pinned weights, after checking the file's sha256 against the manifest."""
        from safetensors.torch import load_file

        from qbd.store import CorruptEntryError, sha256_file

        try:
            digest = sha256_file(pinned.path)
        except OSError as e:
            raise CorruptEntryError(f"zoo model {pinned.path}: cannot read it: {e}") from None
        if digest != pinned.sha256:
            raise CorruptEntryError(f"zoo model {pinned.path}: sha256 {digest[:12]}... does not match the manifest's"
                                    f" {pinned.sha256[:12]}...; restore it (git checkout qbd/zoo/weights) or rebuild the zoo")
        return load_file(str(pinned.path))

    def verify(self) -> list[str]:
        """Problems: a listed file missing or altered, a file the manifest does not list."""
        from qbd.store import sha256_file

        problems = []
        listed = set()
        for _key, rec in sorted(self.models.items()):
            path = self.root / rec["file"]
            listed.add(rec["file"])
            if not path.is_file():
                problems.append(f"{rec['file']}: missing")
            elif sha256_file(path) != rec["sha256"]:
                problems.append(f"{rec['file']}: sha256 does not match the manifest")
        for path in sorted(self.root.glob("*.safetensors")):
            if path.name not in listed:
                problems.append(f"{path.name}: not in the manifest")
        return problems

    def add(self, job: ModelJob, data_fingerprint: str, state_dict: dict[str, Any], metrics: dict[str, Any],
            store_key: str | None) -> Pinned:
        """Write one model and its manifest record (the caller writes the manifest)."""
        import torch
        from safetensors.torch import save_file

        from qbd.store import sha256_file

        self.root.mkdir(parents=True, exist_ok=True)
        name = file_name(job)
        path = self.root / name
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(path))
        key = recipe_key(job, data_fingerprint)
        self.models[key] = {
            "file": name, "sha256": sha256_file(path), "slug": job.slug(), "job": job.to_dict(),
            "store_key": store_key, "data_sha256": data_fingerprint, "revision": TRAINING_REVISION,
            "clean_acc": metrics["clean_acc"], "asr": metrics["asr"], "cpu_threads": metrics.get("cpu_threads"),
            **({"quant_conditioned": metrics["quant_conditioned"]} if "quant_conditioned" in metrics else {}),
            "torch": torch.__version__, "cpu": cpu_name(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return Pinned(key, path, self.models[key])

    def write_manifest(self) -> Path:
        path = self.root / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a run reading the zoo while a build adds models never sees half a manifest
        return path


def default_zoo() -> Zoo | None:
    """$QBD_ZOO (a directory, or "off"), else the zoo inside the package (qbd/zoo/weights: in a
    checkout and in an installed wheel alike)."""
    raw = os.environ.get(ZOO_ENV)
    if raw is not None and raw.strip().lower() in ("off", "0", "none", ""):
        return None
    root = Path(raw).expanduser() if raw else DEFAULT_DIR
    if raw and not root.is_dir():
        raise ConfigError(f"${ZOO_ENV}={raw!r}: not a directory (use 'off' to train every model)")
    return Zoo(root) if (root / MANIFEST).is_file() else None
