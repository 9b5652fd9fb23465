"""Run cells end to end: quantize a trained model, measure CA/ASR, feed a defense the data its
protocol gives it, and record a Result (the contract in docs/architecture.md#contracts).

A `Bench` holds one trained model with its data and caches what its cells share (quantized
models, their metrics, the poisoned training set): one per (dataset, model, attack, seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch

from qbd.attacks import conditioned
from qbd.cell_controls import agreement_control, poison_controls, surrogate_disagrees
from qbd.config import QC_GATES, AttackSpec, ConfigError, attack_record
from qbd.data.base import DataSplit
from qbd.defenses.base import Control, DefenseInputs, Subject, Verdict, params_of
from qbd.defenses.sandbox import run_defense
from qbd.integrity import fingerprint
from qbd.metrics import accuracy, attack_success_rate, to_unit
from qbd.models.base import Classifier
from qbd.poisoning import apply_trigger, poison, triggered_test
from qbd.quant.common import model_device
from qbd.result_types import cell_id
from qbd.results import validate

# Each protocol's data diet. `paper`: what the paper fed every defense (a clean holdout only).
# `canonical`: what each method was designed for (see DEFENSES.md).
PAPER_FEED = frozenset({"clean_holdout", "input_gradients"})


@dataclass(frozen=True)
class BenchSpec:
    """How the test split is shared out, and how much of the training set AC/SS inspect."""

    holdout: int = 500  # clean images the defender holds (NC, FP, STRIP's overlays, calibration)
    stream: int = 400  # incoming inputs for STRIP, half of them triggered
    calib_batches: int = 4  # int8-static calibration batches of 64 holdout images
    seed: int = 0
    # the largest share of the test split the holdout may take; the rest measures ASR and clean accuracy
    max_holdout_share: float = 0.25


class Bench:
    def __init__(
        self,
        data: DataSplit,
        model: Classifier,
        attack: AttackSpec | None,
        *,
        probe_attack: AttackSpec | None = None,
        spec: BenchSpec = BenchSpec(),
        model_name: str = "",
        train_metrics: dict[str, Any] | None = None,
        tier: str = "smoke",
        weights: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        memo: Any = None,
    ) -> None:
        """`attack` is what the model was trained with (None: a clean model). `probe_attack`
        is the trigger used to probe a clean model (its natural ASR, STRIP's stream). `device`:
        where the defenses run; models are quantized on the CPU, and a deployed model whose
        scheme runs only there (torch's int8 kernels) stays there: its Result says so. `memo`: a
        qbd.memo.ResultMemo that files each cell's Result by content and hands it back instead of
        recomputing it (None: every cell computes)."""
        self.data = data
        self.memo = memo
        self.model = model.cpu().eval()
        self.device = torch.device(device)
        self.attack = attack
        self.probe = attack or probe_attack or AttackSpec()
        self.probe.check_fits(*data.image_size, data.num_classes)
        self.spec = spec
        self.model_name = model_name
        self.weights = weights  # provenance (TrainedModel.provenance()); None when not known
        self.train_metrics = train_metrics or {}
        self.tier = tier
        self._quantized: dict[tuple[str, str | None], Any] = {}
        self._surrogates: dict[tuple[str, str | None], Any] = {}
        self._metrics: dict[tuple[str, str | None], dict[str, float]] = {}
        self._agreement: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        self._unchanged: dict[tuple[str, Any, str | None], bool | None] = {}
        self._distributions: dict[str, dict[str, str] | None] = {}
        # the float model's weights as given: restored if a defense edits them (_tampered)
        self._pristine = {k: v.clone() for k, v in self.model.state_dict().items()}
        self._digests: dict[int, str] = {}  # id(model given to defenses) -> its fingerprint (_digest)
        n_test = len(data.y_test)
        if n_test < 20:
            raise ConfigError(f"{data.name}: {n_test} test images are too few to split into holdout and evaluation sets")
        g = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(n_test, generator=g)
        n_hold = min(spec.holdout, int(n_test * spec.max_holdout_share))
        self.holdout_idx = order[:n_hold].sort().values
        self.eval_idx = order[n_hold:].sort().values

    # -- data views ---------------------------------------------------------------------------
    @property
    def holdout(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_test[self.holdout_idx], self.data.y_test[self.holdout_idx]

    @property
    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_test[self.eval_idx], self.data.y_test[self.eval_idx]

    @cached_property
    def triggered_eval(self) -> torch.Tensor:
        x, y = self.eval_set
        return triggered_test(x, y, self.probe, self.data.num_classes)[0]

    @cached_property
    def poisoned_train(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, is_poisoned) exactly as the model was trained on them."""
        if self.attack is None:
            return self.data.x_train, self.data.y_train, torch.zeros(len(self.data.y_train), dtype=torch.bool)
        p = poison(self.data.x_train, self.data.y_train, self.attack, self.data.num_classes)
        return p.x, p.y, p.is_poisoned

    @cached_property
    def stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, is_triggered): incoming test inputs for STRIP, half carrying the trigger
        (drawn from images whose true label is not the target)."""
        x, y = self.eval_set
        g = torch.Generator().manual_seed(self.spec.seed + 7)
        n = min(self.spec.stream, len(y))
        half = n // 2
        order = torch.randperm(len(y), generator=g)
        clean_idx = order[:half]
        rest = order[half:]
        trig_idx = rest[y[rest] != self.probe.target][: n - half]
        xs = torch.cat([x[clean_idx], apply_trigger(x[trig_idx], self.probe)])
        flags = torch.cat([torch.zeros(len(clean_idx), dtype=torch.bool), torch.ones(len(trig_idx), dtype=torch.bool)])
        perm = torch.randperm(len(flags), generator=g)
        return xs[perm], flags[perm]

    def calib(self) -> torch.Tensor:
        x, _ = self.holdout
        n = min(len(x), 64 * self.spec.calib_batches)
        return to_unit(x[:n])

    # -- quantized models ---------------------------------------------------------------------
    def quantized(self, scheme: str, engine: str | None = None) -> Any:
        from qbd.quant import get_scheme

        key = (scheme, engine)
        if key not in self._quantized:
            self._quantized[key] = _place(get_scheme(scheme), get_scheme(scheme).apply(self.model, self.calib(), engine=engine),
                                          self.device)
        return self._quantized[key]

    @cached_property
    def float_on_device(self) -> Classifier:
        """The float model on the bench's device, for repairs that fine-tune it (Fine-Pruning): on a
        GPU run they train there even when the deployed int8 model runs on the CPU."""
        if self.device.type == "cpu":
            return self.model
        import copy

        return copy.deepcopy(self.model).to(self.device)

    def placement(self, scheme: str, engine: str | None = None) -> dict[str, str]:
        """Where the cell's deployed model and its surrogate run, and why the former is not on the
        bench's device when it is not."""
        from qbd.quant import get_scheme

        deployed = str(model_device(self.quantized(scheme, engine).model))
        out = {"device": str(self.device), "deployed": deployed, "surrogate": str(self.device)}
        if deployed != str(self.device):
            runs_on = "/".join(getattr(get_scheme(scheme), "devices", ("cpu",)))
            out["note"] = f"{scheme} runs on {runs_on} only: the deployed model stays on {deployed}"
        return out

    def metrics(self, scheme: str, engine: str | None = None) -> dict[str, float]:
        """Clean accuracy and ASR of the deployed quantized model on the evaluation split."""
        key = (scheme, engine)
        if key not in self._metrics:
            qm = self.quantized(scheme, engine)
            x, y = self.eval_set
            dev = model_device(qm.model)
            self._metrics[key] = {
                "clean_acc": accuracy(qm.model, x, y, device=dev),
                "asr": attack_success_rate(qm.model, self.triggered_eval, self.probe.target, device=dev),
            }
        return self._metrics[key]

    def subject(self, scheme: str, gradient_path: str, engine: str | None = None) -> Subject:
        qm = self.quantized(scheme, engine)
        if gradient_path not in ("deployed", "surrogate"):
            raise ConfigError(f"unknown gradient path {gradient_path!r}; valid: deployed, surrogate")
        if gradient_path == "deployed":
            m = qm.model
        else:
            if (scheme, engine) not in self._surrogates:
                self._surrogates[(scheme, engine)] = qm.surrogate().to(self.device)  # a float twin runs anywhere
            m = self._surrogates[(scheme, engine)]
        return Subject(m, m.embed, m.classify, self.data.num_classes, scheme=scheme, gradient_path=gradient_path,
                       device=model_device(m), float_model=self.float_on_device,
                       redeploy=lambda edited: self.redeploy(edited, scheme, engine))

    def surrogate_agreement(self, scheme: str, engine: str | None = None) -> list[dict[str, Any]]:
        """The audit's agreement on the calibration images, and the same measured here on held-out
        clean and triggered evaluation images (cached per scheme)."""
        from qbd.quant.audit import measure_agreement

        key = (scheme, engine)
        if key not in self._agreement:
            qm = self.quantized(scheme, engine)
            x, _ = self.eval_set
            surrogate = self.subject(scheme, "surrogate", engine).model
            tol = qm.audit.surrogate_rel_tolerance
            self._agreement[key] = [dict(qm.audit.surrogate_agreement), *(
                measure_agreement(surrogate, qm.model, to_unit(images), tolerance=tol, data=name)
                for name, images in (("held-out", x), ("triggered", self.triggered_eval)))]
        return self._agreement[key]

    def input_unchanged(self, scheme: str, layer: Any, gradient_path: str, engine: str | None = None) -> bool | None:
        """For a defense that reads one layer's activations of the deployed model (AC, SS: `layer`
        in its params): whether this scheme leaves them bit-identical to fp32's on the calibration
        images (int8-dynamic quantizes only the classifier), so the cell repeats fp32 and says
        nothing about quantization. None where not measured (other defenses, fp32 itself)."""
        from qbd.defenses import _features as feat
        from qbd.effects import BASELINE

        if layer not in feat.LAYERS or gradient_path != "deployed" or scheme == BASELINE:
            return None
        key = (scheme, layer, engine)
        if key not in self._unchanged:
            x = self.calib()[:64]
            try:
                ours = feat.representations(self.subject(scheme, "deployed", engine), x, layer)
                base = feat.representations(self.subject(BASELINE, "deployed"), x, layer)
                self._unchanged[key] = bool(ours.shape == base.shape and torch.equal(ours, base))
            except feat.LayerUnavailable:
                self._unchanged[key] = None
        return self._unchanged[key]

    def redeploy(self, model: Classifier, scheme: str, engine: str | None = None) -> Subject:
        """An edited copy of the float model (a repair), deployed through the same scheme and
        calibration data as the cell's model."""
        from qbd.quant import get_scheme

        s = get_scheme(scheme)
        m = _place(s, s.apply(model.cpu(), self.calib(), engine=engine), self.device).model  # quantized on the CPU
        return Subject(m, m.embed, m.classify, self.data.num_classes, scheme=scheme, gradient_path="deployed", device=model_device(m))

    def inputs(self, protocol: str, requires: frozenset[str]) -> DefenseInputs:
        hold = self.holdout
        if protocol == "paper":
            return DefenseInputs(clean_holdout=hold, dataset=self.data.name)
        x, y, _ = self.poisoned_train
        return DefenseInputs(
            clean_holdout=hold,
            dataset=self.data.name,
            poisoned_train=(x, y) if "poisoned_train" in requires else None,
            triggered_inputs=self.stream[0] if "triggered_inputs" in requires else None,
            triggered_probe=(self.triggered_eval, self.probe.target) if "triggered_probe" in requires else None,
        )

    # -- a cell -------------------------------------------------------------------------------
    def run(self, defense: Any, scheme: str, *, gradient_path: str | None = None, engine: str | None = None, seed: int = 0,
            timeout_s: float | None = None, progress: Any = None) -> dict[str, Any]:
        """One cell's Result. `progress(done, total)`: a defense's step progress (DefenseInputs)."""
        protocol = getattr(defense, "protocol", "canonical")
        if gradient_path is None:
            # only gradient-based defenses ever need the surrogate; the others inspect the
            # model as deployed (its quantized features and logits)
            needs_grad = "input_gradients" in defense.requires
            gradient_path = "surrogate" if protocol == "canonical" and needs_grad else "deployed"
        t0 = time.perf_counter()
        # a run-wide engine (--engine fbgemm) is for the schemes that take one; fp32 and the
        # simulated schemes run as they are (qbd.run_cli refuses an engine no selected scheme takes)
        from qbd.quant import get_scheme

        engine = engine if get_scheme(scheme).engines else None
        key = None
        if self.memo is not None:
            from qbd.memo import answers, cell_parts

            parts = cell_parts(self, defense, scheme, gradient_path=gradient_path, engine=engine, seed=seed, timeout_s=timeout_s)
            key = None if parts is None else self.memo.key(parts)
            found = None if key is None else self.memo.get(key)
            if found is not None and answers(found, cell=self._cell_id(scheme, defense.name, protocol), seed=seed, scheme=scheme,
                                             gradient_path=gradient_path, attack=attack_record(self.attack)):
                return found
        result = self._compute(defense, scheme, protocol, gradient_path, engine, seed, timeout_s, progress, t0)
        if key is not None:
            from qbd.memo import files_result

            filed = files_result(result, defense) and self.memo.put(key, result)
            result["memo"] = {"key": key, "reused": False, "session": self.memo.session, "filed": filed}
        return result

    @cached_property
    def data_sha256(self) -> str:
        """The data set's fingerprint (every image and label), for the memo's key."""
        return self.data.fingerprint()

    @property
    def model_sha256(self) -> str:
        """The float model's fingerprint as the bench was given it, for the memo's key."""
        return self._digest(self.model)

    def _compute(self, defense: Any, scheme: str, protocol: str, gradient_path: str, engine: str | None, seed: int,
                 timeout_s: float | None, progress: Any, t0: float) -> dict[str, Any]:
        qm = self.quantized(scheme, engine)
        metrics = self.metrics(scheme, engine)
        subject = self.subject(scheme, gradient_path, engine)
        inputs = replace(self.inputs(protocol, frozenset(defense.requires)), progress=progress)
        given = [m for m in (subject.model, subject.float_model) if m is not None]
        before = [self._digest(m) for m in given]
        verdict, _ = run_defense(defense, subject, inputs, torch.Generator().manual_seed(seed), timeout_s=timeout_s)
        if [fingerprint(m) for m in given] != before:
            verdict = self._tampered(verdict, defense.name, scheme, engine)
        self._add_controls(verdict, qm, scheme, metrics)
        if gradient_path == "surrogate" and qm.audit.surrogate_agreement:
            # assigned, not setdefault: a defense must not be able to pre-fill a passing control
            try:
                control = agreement_control(self.surrogate_agreement(scheme, engine), qm.audit.surrogate_rel_tolerance)
            except Exception as e:  # a failed measurement is a failed control, not a lost cell
                control = Control(False, None, f"surrogate vs runtime could not be measured: {type(e).__name__}: {e}")
            verdict.controls["surrogate_agrees_with_runtime"] = control
            if not control.passed:
                verdict = surrogate_disagrees(verdict, control)
        params = params_of(defense)
        result = {
            "cell": self._cell_id(scheme, defense.name, protocol),
            "dataset": self.data.name,
            "model": self.model_name,
            "weights": self.weights,
            "seed": seed,
            "tier": self.tier,
            "attack": attack_record(self.attack),
            "quant": {"scheme": scheme, "audit": qm.audit.to_dict()},
            "placement": self.placement(scheme, engine),
            "defense": {"name": defense.name, "protocol": protocol, "gradient_path": gradient_path, "params": params,
                        "distribution": self.distribution(defense),
                        "input_unchanged": self.input_unchanged(scheme, params.get("layer"), gradient_path, engine),
                        # a detection must name the planted target unless the defense declares it names none
                        "names_target": getattr(defense, "names_target", True) is not False},
            "verdict": verdict.to_dict(),
            "clean_acc": metrics["clean_acc"],
            "asr": metrics["asr"],
            "truth": self._truth(verdict, metrics["asr"]),
            "seconds": round(time.perf_counter() - t0, 3),
            "versions": _versions(),
        }
        # checked against the Result's types where it is made: a part built here that breaks the
        # contract (a scheme's audit, the params) fails with the cell named, not later in a reader
        validate(result)
        return result

    def _cell_id(self, scheme: str, defense: str, protocol: str) -> str:
        return cell_id(self.data.name if self.attack is not None else f"{self.data.name}:clean", scheme, defense, protocol)

    def _digest(self, model: Any) -> str:
        """The model's fingerprint as handed to the first cell (taken once; each cell re-takes it after)."""
        if id(model) not in self._digests:
            self._digests[id(model)] = fingerprint(model)
        return self._digests[id(model)]

    def _tampered(self, verdict: Verdict, name: str, scheme: str, engine: str | None) -> Verdict:
        """The defense edited a model it was given: its verdict is about a model nobody deploys,
        and the next cells must not inherit the edit. The float model is restored and everything
        deployed from it is rebuilt on demand."""
        import copy

        self.model.load_state_dict(self._pristine)
        self.__dict__.pop("float_on_device", None)
        for cache in (self._quantized, self._surrogates, self._digests):
            cache.clear()
        said = {"status": verdict.status, "target_class": verdict.target_class, "score": verdict.score}
        return Verdict.invalid(f"{name} changed the weights of the model it was given ({scheme}); a defense must work on"
                               " a copy (copy.deepcopy(subject.model)) or on subject.float_model through subject.redeploy",
                               "error", evidence={"defense_verdict": said}, controls=copy.copy(verdict.controls))

    def distribution(self, defense: Any) -> dict[str, str] | None:
        from qbd.defenses import ENTRY_POINT_GROUP
        from qbd.registry import distribution_of

        module = type(defense).__module__
        if module not in self._distributions:  # package metadata is read once per module
            self._distributions[module] = distribution_of(defense, ENTRY_POINT_GROUP)
        return self._distributions[module]

    def _add_controls(self, verdict: Verdict, qm: Any, scheme: str, metrics: dict[str, float]) -> None:
        audit = qm.audit
        from qbd.quant import get_scheme

        if getattr(get_scheme(scheme), "quantizes", True):  # a third-party scheme may be a bare Scheme
            verdict.controls.setdefault(
                "quantizer_applied",
                Control(audit.quantized_param_fraction > 0, audit.quantized_param_fraction, f"{len(audit.quantized_modules)} modules quantized"),
            )
        if self.attack is not None:
            verdict.controls.setdefault(
                "backdoor_persists", Control(metrics["asr"] >= 0.5, metrics["asr"], "ASR of the deployed quantized model (>= 0.5)"
                                             + ("; a quant-conditioned backdoor is dormant where it is not deployed through its scheme"
                                                if conditioned(self.attack.name) else ""))
            )
        if self.attack is not None and verdict.suspects is not None and verdict.suspects.get("data") == "poisoned_train":
            verdict.controls.update(poison_controls(verdict, self.poisoned_train[2], self.poisoned_train[1], self.attack.target))

    def _truth(self, verdict: Verdict, asr: float) -> dict[str, Any]:
        """Ground truth the defense never saw, for reports: did it name the real target, and does
        this model obey the trigger? A quant-conditioned model is backdoored in FP32 too (what ships
        is its quantized self), its backdoor there dormant."""
        target = None if self.attack is None else self.attack.target
        named = None
        if target is not None and verdict.status == "detected" and verdict.target_class is not None:
            named = verdict.target_class == target
        backdoor = None
        if self.attack is not None:
            dormant = conditioned(self.attack.name) and asr <= QC_GATES["max_fp32_asr"]
            backdoor = "dormant" if dormant else "active" if asr >= 0.5 else None
        return {"backdoored": self.attack is not None, "target": target, "target_named": named, "backdoor": backdoor}


def tier_bench(data: DataSplit, tm: Any, attack: AttackSpec | None, *, model_name: str, tier: str, seed: int,
               probe_attack: AttackSpec | None = None, device: str | torch.device = "cpu", memo: Any = None) -> Bench:
    """The Bench the matrix builds for one trained model (`tm`, a qbd.trained TrainedModel) of the
    tier: the tier's holdout and stream, seeded with the model's seed. The one construction that
    `qbd run`, `qbd train`, the plugin and the sweeps over seeds share, so they measure one ASR."""
    from qbd.tiers import TIERS

    t = TIERS[tier]
    return Bench(data, tm.model, attack, probe_attack=probe_attack, model_name=model_name,
                 spec=BenchSpec(holdout=t.holdout, stream=t.stream, seed=seed), train_metrics=tm.metrics, tier=tier,
                 weights=tm.provenance(), device=device, memo=memo)


def _place(scheme: Any, qm: Any, device: torch.device) -> Any:
    """Move the deployed model to `device` where its scheme runs there (`Scheme.devices`)."""
    if device.type != "cpu" and device.type in getattr(scheme, "devices", ("cpu",)):
        qm.model.to(device)
    return qm


def _versions() -> dict[str, str]:
    import torchvision

    from qbd import __version__

    # the thread count too: Fine-Pruning's fine-tuning reduces gradients differently per count
    return {"qbd": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads()}
