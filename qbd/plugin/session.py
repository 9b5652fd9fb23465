"""Session: what a worker holds while its qbd tests run (the device, the expectations, a bench per
model and scheme, the defenses), built on first use; torch is imported then, never at collection."""

from __future__ import annotations

import os
from typing import Any

import pytest

from qbd.plugin.state import QbdState


# -- fixtures -----------------------------------------------------------------------------------
class Session:
    """Gets benches (trained model + data + quantized copies) lazily, one per data set and kind,
    from the store: a model is trained at most once per machine, whatever the worker count."""

    def __init__(self, state: QbdState) -> None:
        self.state = state
        self._benches: dict[tuple[str, str, int], Any] = {}
        self._data: dict[str, Any] = {}
        self._device: str | None = None
        self._memo: Any = None

    @property
    def device(self) -> str:
        """This worker's device (qbd.devices.resolve of --qbd-device). The paper tier on `auto`
        without a GPU skips: ResNet-18 at the paper's scale is not practical on a CPU unless the
        user asks for it (--qbd-device cpu)."""
        if self._device is None:
            from qbd import devices
            from qbd.errors import ConfigError

            try:
                device = devices.resolve(self.state.device)
            except ConfigError as e:
                pytest.fail(f"--qbd-device: {e}", pytrace=False)
            if self.state.tier == "paper" and self.state.device == "auto" and devices.is_cpu(device):
                pytest.skip("the paper tier trains ResNet-18 at the paper's scale: no CUDA device here (--qbd-device cpu to insist)")
            self._device = device
        return self._device

    @property
    def expectations(self) -> Any:
        if self.state.expectations is None:  # --qbd-accept starting a new table: the truth alone
            from qbd.expectations import Expectations

            self.state.expectations = Expectations(path=self.state.expectations_path, tier=self.state.tier)
        return self.state.expectations

    def bench(self, dataset: str, kind: str = "backdoored", seed: int = 0) -> Any:
        key = (dataset, kind, seed)
        if key not in self._benches:
            self._benches[key] = bench = self._make_bench(dataset, kind, seed)
            origin = (getattr(bench, "weights", None) or {}).get("origin", "unknown")
            self.state.pending_loads.append({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                                             "model": f"{dataset}/{kind}/seed{seed}", "device": self.device,
                                             "origin": {"zoo": "the pinned zoo", "trained": "trained by qbd (the store)",
                                                        "fetched": "fetched (pinned sha256)"}.get(origin, origin)})
        return self._benches[key]

    @property
    def memo(self) -> Any:
        """The session's qbd.memo.ResultMemo, beside the model store (shared by the xdist workers)."""
        if self._memo is None:
            from qbd.memo import for_store
            from qbd.remote_store import open_store

            self._memo = for_store(open_store(self.state.cache_dir), **self.state.memo)
        return self._memo

    def job(self, dataset: str, kind: str = "backdoored", seed: int = 0, device: str = "cpu") -> Any:
        """Model number `seed` of the tier's recipe (qbd.presets.seeded_job): training seed and, for
        the backdoored model, the attack seed of --qbd-attack's preset (default BadNet)."""
        from qbd.presets import attack_preset, seeded_job
        from qbd.tiers import TIERS as TIER_TABLE

        model = TIER_TABLE[self.state.tier].model
        return seeded_job(dataset, model, seed, attack_preset(self.state.attack_name) if kind == "backdoored" else None,
                          precision="fp32" if device.startswith("cpu") else "bf16")

    def by_rates(self, result: dict[str, Any]) -> bool:
        from qbd.rates import row_id

        return self.state.by_rates(row_id(result))

    def _make_bench(self, dataset: str, kind: str, seed: int) -> Any:
        import torch

        from qbd import devices

        device = self.device
        if devices.is_cpu(device):  # one thread: CPU verdicts must not depend on the worker count
            _single_thread(torch)
        else:  # the CPU-only int8 cells share the host's cores among the GPU workers
            share_cores(torch)
            devices.prepare(device)
        from qbd.config import DatasetSpec, Gates
        from qbd.data import load_dataset
        from qbd.evaluate import tier_bench
        from qbd.remote_store import open_store
        from qbd.tiers import TIERS as TIER_TABLE
        from qbd.train import check_gates
        from qbd.trained import get_trained

        tier = TIER_TABLE[self.state.tier]
        if dataset not in self._data:
            self._data[dataset] = load_dataset(DatasetSpec(dataset), self.state.data_root)
        data = self._data[dataset]
        job = self.job(dataset, kind, seed, device)
        attack = job.attack
        source = self.state.model_files.get(dataset) if kind == "backdoored" else None
        if source is not None:  # the user's weights stand in for the trained backdoored model
            from qbd.fetch import get_fetched

            tm = get_fetched(source, job, data, open_store(self.state.cache_dir), device=device)
        else:
            tm = get_trained(job, data, open_store(self.state.cache_dir), device=device, progress=False)
        check_gates(tm.metrics, Gates(), attacked=attack is not None)
        # the clean model is probed with the trigger its seed's backdoored model carries
        return tier_bench(data, tm, attack, probe_attack=self.job(dataset, "backdoored", seed).attack, model_name=tier.model,
                          tier=self.state.tier, seed=seed, device=device, memo=self.memo)

    def defense(self, name: str, protocol: str) -> Any:
        from qbd.errors import ConfigError
        from qbd.runner import load_defense

        ref = next(r for r, n in self.state.matrix().items() if n == name)
        if ref in self.state.defense_names:  # a built-in, or a --qbd-defense the user named: errors are theirs
            try:
                return load_defense(ref, protocol, self.state.tier)
            except ConfigError as e:  # the defense's own contract: one line saying what to fix, no qbd traceback
                pytest.fail(f"qbd: {e}", pytrace=False)
        try:
            return load_defense(ref, protocol, self.state.tier)
        except ConfigError as e:  # an installed entry point nobody named: a warning and skipped cells, as in `qbd run`
            import warnings

            warnings.warn(f"qbd: skipped {e}", pytest.PytestWarning, stacklevel=2)
            pytest.skip(f"qbd: skipped {e}")


def share_cores(torch: Any) -> None:
    """Under xdist, give each worker its share of the cores: N workers x all-cores threads
    oversubscribe the CPU, and OpenMP's spinning threads then run several times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and workers.isdigit() and int(workers) > 0:
        share = max(1, (os.cpu_count() or 1) // int(workers))
        if torch.get_num_threads() > share:
            torch.set_num_threads(share)


def _single_thread(torch: Any) -> None:
    """Matrix cells run on one thread whatever the worker count: Fine-Pruning's fine-tuning
    reduces gradients differently per thread count, and `pytest -n 0` must give the same
    verdicts as `pytest -n 2` (use -n auto for the cores)."""
    torch.set_num_threads(1)
