"""Get a trained model for a job: from the pinned zoo (qbd.zoo.pinned), else from the store, else
train it once and store it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qbd.config import ModelJob
from qbd.data.base import DataSplit
from qbd.models import Classifier, build_model
from qbd.store import CorruptEntryError, Entry, Store

if TYPE_CHECKING:
    from qbd.remote_store import UrlStore


@dataclass
class TrainedModel:
    job: ModelJob
    model: Classifier
    metrics: dict[str, Any]
    entry: Entry

    @property
    def cache(self) -> str:
        if "zoo" in self.entry.meta:
            return "zoo"
        return "hit" if self.entry.hit else "miss"

    @property
    def source(self) -> str:
        """Where the weights came from, in words, for progress lines ("cache hit" would read as an
        outcome beside the matrix's `miss`)."""
        fetched = "fetched" in self.entry.meta
        if "zoo" in self.entry.meta:
            return "from the pinned zoo"
        if self.entry.hit:
            return "from the store" + (" (fetched earlier)" if fetched else " (trained earlier)")
        return ("fetched" if fetched else "trained") + " now, stored"

    @property
    def weights_file(self) -> Path | str:
        """The safetensors file the weights were loaded from (a zoo file, or the store entry's;
        a URL for a store on a URL)."""
        return self.entry.path if "zoo" in self.entry.meta else (self.entry.weights or self.entry.path)

    def provenance(self) -> dict[str, Any]:
        """Where the weights came from, for every Result: the pinned zoo, trained by qbd, or
        fetched (untrusted, pinned by sha256)."""
        if "zoo" in self.entry.meta:
            return dict(self.entry.meta["zoo"])
        fetched = self.entry.meta.get("fetched")
        if fetched:
            return {"origin": "fetched", "store_key": self.entry.key, **fetched}
        return {"origin": "trained", "store_key": self.entry.key}


def load_weights(job: ModelJob, data: DataSplit, state_dict: dict[str, torch.Tensor]) -> Classifier:
    """Rebuild the job's architecture and load `state_dict` strictly (every tensor must match)."""
    model = build_model(job.model.name, data.num_classes, data.mean, data.std)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def get_trained(
    job: ModelJob,
    data: DataSplit,
    store: Store | UrlStore,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    zoo: Any = "default",
) -> TrainedModel:
    """`zoo`: "default" (qbd.zoo.pinned.default_zoo: qbd/zoo/weights or $QBD_ZOO), a qbd.zoo.pinned.Zoo, or
    None to skip it (building the zoo itself)."""
    fingerprint = data.fingerprint()
    if zoo == "default":
        from qbd.zoo.pinned import default_zoo

        zoo = default_zoo()
    pinned = None if zoo is None else zoo.find(job, fingerprint)
    if pinned is not None:
        state = zoo.load(pinned)  # sha256-verified
        rec = pinned.record
        metrics = {"clean_acc": rec["clean_acc"], "asr": rec["asr"], "cpu_threads": rec.get("cpu_threads"),
                   **({"quant_conditioned": rec["quant_conditioned"]} if "quant_conditioned" in rec else {})}
        entry = Entry(key=pinned.key, path=pinned.path, state_dict=state, meta={"metrics": metrics, "zoo": pinned.provenance()}, hit=True)
        return TrainedModel(job=job, model=load_weights(job, data, state), metrics=metrics, entry=entry)

    def create() -> tuple[dict[str, Any], dict[str, Any]]:
        from qbd.train import train

        result = train(job, data, device=device, progress=progress)
        meta = {"job": job.to_dict(), "slug": job.slug(), "metrics": result.metrics, "data_sha256": fingerprint}
        return result.model.state_dict(), meta

    from qbd.train import cpu_train_threads, resolve_device

    threads = cpu_train_threads() if resolve_device(device).type == "cpu" else None
    entry = store.get_or_create(job.key(fingerprint, threads), create, describe=job.slug(), log=log)
    if "fetched" in entry.meta:  # fetched weights live under their own keys (qbd.fetch); never pass as trained
        raise CorruptEntryError(f"store entry {entry.key} holds fetched weights under a trained job's key; remove it")
    model = load_weights(job, data, entry.state_dict)
    return TrainedModel(job=job, model=model, metrics=dict(entry.meta["metrics"]), entry=entry)
