import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qbd.store import CorruptEntryError, Store, StoreError, sha256_file

KEY = "a" * 64


def _state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(4)}


def test_round_trip_and_metadata(tmp_path):
    store = Store(tmp_path)
    store.save(KEY, _state(), {"metrics": {"clean_acc": 0.9}})
    assert store.has(KEY) and store.keys() == [KEY]
    e = store.load(KEY)
    assert torch.equal(e.state_dict["w"], _state()["w"])
    assert e.meta["metrics"] == {"clean_acc": 0.9}
    assert e.meta["weights_sha256"] == sha256_file(e.path / "weights.safetensors")
    assert e.meta["versions"]["torch"] == torch.__version__
    assert not any((tmp_path / "tmp").iterdir()), "temporary files left behind"


def test_invalid_key_refused(tmp_path):
    with pytest.raises(StoreError, match="64 lowercase hex"):
        Store(tmp_path).entry_dir("../../etc")


def test_tampered_weights_detected_and_recreated(tmp_path):
    store = Store(tmp_path)
    store.save(KEY, _state(), {})
    w = store.entry_dir(KEY) / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptEntryError, match="does not match"):
        store.load(KEY)
    calls = []
    e = store.get_or_create(KEY, lambda: (calls.append(1), (_state(), {}))[1], log=lambda m: None)
    assert calls == [1] and not e.hit
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


def test_failed_create_leaves_no_entry(tmp_path):
    store = Store(tmp_path)

    def boom():
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError, match="training crashed"):
        store.get_or_create(KEY, boom)
    assert not store.has(KEY) and store.keys() == []


def test_failed_write_leaves_no_partial_entry(tmp_path, monkeypatch):
    store = Store(tmp_path)
    import qbd.store

    def broken_fsync(path):
        raise OSError("disk full")

    monkeypatch.setattr(qbd.store, "_fsync_dir_files", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.save(KEY, _state(), {})
    assert not store.entry_dir(KEY).exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_hit_after_miss(tmp_path):
    store = Store(tmp_path)
    first = store.get_or_create(KEY, lambda: (_state(), {"n": 1}))
    second = store.get_or_create(KEY, lambda: pytest.fail("must not recreate"))
    assert (first.hit, second.hit) == (False, True)
    assert second.meta["n"] == 1


WORKER = textwrap.dedent(
    """
    import json, os, sys, time, torch
    from qbd.store import Store
    root, key, log = sys.argv[1], sys.argv[2], sys.argv[3]
    def create():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # long enough for the others to queue on the lock
        return {"w": torch.arange(6.0)}, {}
    e = Store(root).get_or_create(key, create, log=lambda m: None)
    print(json.dumps({"hit": e.hit, "sha": e.meta["weights_sha256"]}))
    """
)


def test_concurrent_processes_create_once(tmp_path):
    log = tmp_path / "creates.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "store"), KEY, str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["hit"] for o in outs) == [False, True, True, True]
    assert len({o["sha"] for o in outs}) == 1
    assert len(log.read_text().split()) == 1
    assert len(os.listdir(tmp_path / "store" / "models")) == 1


def test_lock_timeout_gives_clear_error(tmp_path):
    store = Store(tmp_path, lock_timeout=0.2)
    lock = store._lock(KEY)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from filelock import FileLock; l = FileLock({str(lock.lock_file)!r}); l.acquire(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match="timed out after 0 s waiting for the lock"):
            store.get_or_create(KEY, lambda: (_state(), {}), log=lambda m: None)
    finally:
        holder.kill()
        holder.wait()
    # a killed holder releases its flock: no stale lock
    assert not store.get_or_create(KEY, lambda: (_state(), {})).hit


KILLED = textwrap.dedent(
    """
    import sys, time, torch
    import qbd.store
    from qbd.store import Store
    root, key, stage = sys.argv[1], sys.argv[2], sys.argv[3]
    def create():
        if stage == "create":  # holding the key's lock, "training"
            print("creating", flush=True)
            time.sleep(600)
        return {"w": torch.arange(6.0)}, {}
    def hang(d):  # the entry is written in tmp/ but not yet renamed into models/
        print("writing", flush=True)
        time.sleep(600)
    if stage == "write":
        qbd.store._fsync_dir_files = hang
    Store(root).get_or_create(key, create, log=lambda m: None)
    """
)


def _start_then_kill(root, stage: str, check_alive=None) -> None:
    """Run KILLED until it reports `stage`, call `check_alive()` meanwhile, then SIGKILL it."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(root), KEY, stage], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == {"write": "writing", "create": "creating"}[stage]
        if check_alive is not None:
            check_alive()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX")


@posix_only
def test_writer_killed_mid_write_leaves_no_visible_entry(tmp_path):
    root = tmp_path / "store"

    def partial_write_exists():
        (partial,) = (root / "tmp").iterdir()
        assert (partial / "weights.safetensors").is_file()

    _start_then_kill(root, "write", partial_write_exists)
    store = Store(root, lock_timeout=5)
    assert not store.has(KEY) and store.keys() == [] and not store.entry_dir(KEY).exists()
    calls = []
    e = store.get_or_create(KEY, lambda: (calls.append(1), ({"w": torch.arange(6.0)}, {}))[1], log=lambda m: None)
    assert calls == [1] and not e.hit and torch.equal(e.state_dict["w"], torch.arange(6.0))
    assert list((root / "tmp").iterdir()) == [], "the dead writer's partial entry was not cleaned up"
    assert store.get_or_create(KEY, lambda: pytest.fail("must not recreate")).hit


@posix_only
def test_lock_of_a_killed_holder_is_released_but_a_live_one_times_out(tmp_path):
    root = tmp_path / "store"

    def live_holder_blocks():
        with pytest.raises(StoreError, match=r"timed out after 0 s waiting for the lock.*another process is still creating it"):
            Store(root, lock_timeout=0.3).get_or_create(KEY, lambda: pytest.fail("lock is held"), log=lambda m: None)

    _start_then_kill(root, "create", live_holder_blocks)
    lock_file = root / "locks" / f"{KEY}.lock"
    assert lock_file.exists()  # the file stays; the flock on it died with its holder
    from filelock import FileLock

    free = FileLock(str(lock_file))
    free.acquire(timeout=0)  # would raise Timeout if the dead holder's flock had survived
    free.release()
    e = Store(root, lock_timeout=2).get_or_create(KEY, lambda: (_state(), {}), log=lambda m: None)
    assert not e.hit and Store(root).has(KEY)


def test_corrupt_entry_refused_when_it_cannot_be_recreated(tmp_path):
    store = Store(tmp_path)
    store.save(KEY, _state(), {})
    (store.entry_dir(KEY) / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptEntryError, match=r"does not match.*moved to .*quarantine.*; fetch it again"):
        store.get_or_create(KEY, lambda: pytest.fail("must not recreate"), refuse_corrupt="fetch it again")
    assert not store.has(KEY)
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


def test_verify_reports_and_quarantines(tmp_path):
    store = Store(tmp_path)
    good, bad = "b" * 64, "c" * 64
    store.save(good, _state(), {})
    store.save(bad, _state(), {})
    (store.entry_dir(bad) / "meta.json").write_text("[]")
    (tmp_path / "models" / "stray").mkdir()
    report = store.verify()
    assert report[good] is None
    assert "does not describe this entry" in report[bad]
    assert "not a store key" in report["stray"]
    assert store.entry_dir(bad).exists()  # reporting moves nothing
    store.verify(quarantine=True)
    assert store.entry_names() == [good]
    assert len(list((tmp_path / "quarantine").iterdir())) == 2
