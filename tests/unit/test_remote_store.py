"""qbd.remote_store: the store on a URL, on file:// and on a real S3 protocol (moto's HTTP server)."""

import hashlib
import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch

from qbd.errors import ConfigError
from qbd.remote_store import ORPHAN, UrlStore, open_store
from qbd.store import CorruptEntryError, Store, StoreError

KEY = "a" * 64


def _state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(4)}


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on a free local port (one per xdist worker), with the AWS_* environment
    pointing at it (inherited by subprocesses) and one bucket."""
    import moto.server as server_mod  # the test extra installs them: a missing one fails, never skips
    import s3fs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one line per request otherwise
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
                mp.setenv(k, v)
            import s3fs

            # moto keeps its buckets per process, not per server: when the scheduler splits this module
            # and a worker sets the fixture up again, the bucket is already there (each test has its own prefix)
            s3fs.S3FileSystem(skip_instance_cache=True).makedirs("qbd-test", exist_ok=True)
            yield "qbd-test"
    finally:
        werkzeug.setLevel(level)
        server.stop()


@pytest.fixture(params=["file", "s3"])
def url(request, tmp_path):
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{uuid.uuid4().hex}"  # a fresh prefix per test


def _lease_path(store: UrlStore, key: str = KEY) -> str:
    return store._path("locks", f"{key}.json")


def _files(store: UrlStore, *parts: str) -> list[str]:
    return [f.rsplit("/", 1)[1] for f in store._files(*parts)]


def test_round_trip_and_metadata(url):
    store = UrlStore(url + "/")
    assert store.root == url
    path = store.save(KEY, _state(), {"metrics": {"clean_acc": 0.9}})
    assert path == store.entry_dir(KEY) == f"{url}/models/{KEY}"
    assert store.has(KEY) and store.keys() == [KEY] and store.entry_names() == [KEY]
    e = store.load(KEY)
    assert torch.equal(e.state_dict["w"], _state()["w"]) and e.hit
    raw = store.fs.cat_file(store._path("models", KEY, e.meta["weights_file"]))
    sha = hashlib.sha256(raw).hexdigest()
    assert e.meta["weights_sha256"] == sha and e.meta["weights_file"] == f"weights-{sha}.safetensors"
    assert e.meta["metrics"] == {"clean_acc": 0.9} and e.meta["key"] == KEY and e.meta["format"] == 1
    assert e.meta["versions"]["torch"] == torch.__version__ and e.meta["created"].endswith("Z")
    assert e.weights == f"{url}/models/{KEY}/weights-{sha}.safetensors" and e.path == path
    assert sorted(_files(store, "models", KEY)) == ["meta.json", e.meta["weights_file"]]
    assert store.stale_tmp() == [] and store.read_meta(KEY) == e.meta


def test_open_store_picks_the_store_by_its_root(tmp_path, monkeypatch):
    monkeypatch.delenv("QBD_CACHE_DIR", raising=False)
    assert type(open_store(tmp_path)) is Store and open_store(tmp_path).root == tmp_path
    u = open_store((tmp_path / "u").as_uri(), lock_timeout=3)
    assert isinstance(u, UrlStore) and u.lock_timeout == 3
    monkeypatch.setenv("QBD_CACHE_DIR", (tmp_path / "env").as_uri())
    assert isinstance(open_store(), UrlStore) and open_store().root == (tmp_path / "env").as_uri()
    monkeypatch.setenv("QBD_CACHE_DIR", str(tmp_path / "plain"))
    assert type(open_store()) is Store and open_store().root == tmp_path / "plain"


def test_invalid_key_refused(url):
    store = UrlStore(url)
    for call in (lambda: store.entry_dir("../../etc"), lambda: store.has("A" * 64), lambda: store.load("x")):
        with pytest.raises(StoreError, match="64 lowercase hex"):
            call()


def test_bad_settings_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown protocol 'nosuch'"):
        UrlStore("nosuch://x")
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "qbdnopkg", {"class": "qbd_no_such_pkg.FS", "err": "missing"})
    with pytest.raises(ConfigError, match="qbdnopkg:// needs a package that is not installed: pip install qbd_no_such_pkg"):
        open_store("qbdnopkg://bucket/x")
    monkeypatch.setenv("QBD_LOCK_STALE_AFTER", "soon")
    with pytest.raises(ConfigError, match=r"\$QBD_LOCK_STALE_AFTER must be a number of seconds > 0, got 'soon'"):
        UrlStore(tmp_path.as_uri())
    monkeypatch.setenv("QBD_LOCK_STALE_AFTER", "7")
    monkeypatch.setenv("QBD_LOCK_TIMEOUT", "-1")
    with pytest.raises(ConfigError, match=r"\$QBD_LOCK_TIMEOUT must be"):
        UrlStore(tmp_path.as_uri())
    assert UrlStore(tmp_path.as_uri(), lock_timeout=2).stale_after == 7


def _tamper(store: UrlStore) -> None:
    name = store.read_meta(KEY)["weights_file"]
    path = store._path("models", KEY, name)
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 0xFF
    store._put(path, bytes(data))


def test_tampered_weights_detected_and_recreated(url):
    store = UrlStore(url)
    store.save(KEY, _state(), {})
    _tamper(store)
    with pytest.raises(CorruptEntryError, match="does not match"):
        store.load(KEY)
    calls, logs = [], []
    e = store.get_or_create(KEY, lambda: (calls.append(1), (_state(1), {}))[1], log=logs.append)
    assert calls == [1] and not e.hit and torch.equal(e.state_dict["w"], _state(1)["w"])
    assert any("moved to" in m and "recreating it" in m for m in logs)
    (q,) = store.fs.ls(store._path("quarantine"), detail=False)
    moved = sorted(_files(store, "quarantine", q.rsplit("/", 1)[1]))
    assert moved[:2] == ["QUARANTINED", "meta.json"] and len(moved) == 3 and moved[2].startswith("weights-")
    assert b"does not match" in store.fs.cat_file(q + "/QUARANTINED")
    assert store.verify() == {KEY: None}


def test_corrupt_entry_refused_when_it_cannot_be_recreated(url):
    store = UrlStore(url)
    store.save(KEY, _state(), {})
    _tamper(store)
    with pytest.raises(CorruptEntryError, match=r"does not match.*moved to .*/quarantine/.*; fetch it again"):
        store.get_or_create(KEY, lambda: pytest.fail("must not recreate"), refuse_corrupt="fetch it again", log=lambda m: None)
    assert not store.has(KEY) and store.keys() == [] and store.entry_names() == []
    assert store._read(_lease_path(store)) is None


def test_failed_create_leaves_no_entry_and_releases_the_lease(url):
    store = UrlStore(url, lock_timeout=30)

    def boom():
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError, match="training crashed"):
        store.get_or_create(KEY, boom)
    assert not store.has(KEY) and store.keys() == [] and store._read(_lease_path(store)) is None
    logs = []
    t0 = time.monotonic()
    assert not store.get_or_create(KEY, lambda: (_state(), {}), log=logs.append).hit
    assert logs == [] and time.monotonic() - t0 < 5  # no waiting on a leftover lease


def test_hit_after_miss(url):
    store = UrlStore(url)
    first = store.get_or_create(KEY, lambda: (_state(), {"n": 1}))
    second = UrlStore(url).get_or_create(KEY, lambda: pytest.fail("must not recreate"))
    assert (first.hit, second.hit) == (False, True)
    assert second.meta["n"] == 1 and second.weights == first.weights
    assert store._read(_lease_path(store)) is None


WORKER = textwrap.dedent(
    """
    import json, os, sys, time, torch
    from qbd.remote_store import UrlStore
    url, key, log, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    def create():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        print("creating", flush=True)
        time.sleep(pause)  # long enough for the other to queue on the lease
        return {"w": torch.arange(6.0)}, {}
    store = UrlStore(url)
    store.keys()  # the client's set-up (credentials, connection) before the start line
    print("ready", flush=True)
    sys.stdin.readline()  # "go": start together
    e = store.get_or_create(key, create, log=lambda m: None)
    print(json.dumps({"hit": e.hit, "sha": e.meta["weights_sha256"]}), flush=True)
    """
)


def _worker(url, log, pause=1.5, **env):
    import os

    return subprocess.Popen([sys.executable, "-c", WORKER, url, KEY, str(log), str(pause)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_two_processes_create_once(url, tmp_path):
    log = tmp_path / "creates.log"
    procs = [_worker(url, log) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.communicate(timeout=60)[0].replace("creating\n", "")) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o["hit"] for o in outs) == [False, True]
    assert len({o["sha"] for o in outs}) == 1
    assert len(log.read_text().split()) == 1
    store = UrlStore(url)
    assert store.keys() == [KEY] and _files(store, "models").count("meta.json") == 1
    assert store._read(_lease_path(store)) is None and store.verify() == {KEY: None}


def test_racing_publishers_without_the_lease_end_with_the_winners_entry(url):
    store = UrlStore(url)
    a = store._publish(KEY, _state(0), {"who": "a"})
    b = store._publish(KEY, _state(1), {"who": "b"})  # lost: different bytes
    assert (a.hit, b.hit) == (False, True)
    assert b.meta["who"] == "a" and b.meta["weights_sha256"] == a.meta["weights_sha256"]
    assert torch.equal(b.state_dict["w"], _state(0)["w"])
    assert sorted(_files(store, "models", KEY)) == sorted(["meta.json", a.meta["weights_file"]])  # b's bytes removed
    c = store._publish(KEY, _state(0), {"who": "c"})  # lost with the same bytes: the winner's weights stay
    assert c.hit and c.meta["who"] == "a"
    assert store.verify() == {KEY: None} and store.stale_tmp() == []
    with pytest.raises(FileExistsError):
        store.save(KEY, _state(2), {})
    assert store.load(KEY).meta["who"] == "a"


def _write_lease(store: UrlStore, heartbeat: float) -> None:
    rec = {"owner": "someone", "host": "elsewhere", "pid": 1, "created": heartbeat, "heartbeat": heartbeat}
    store._put(_lease_path(store), json.dumps(rec).encode())


def test_a_stale_lease_is_broken(url):
    store = UrlStore(url, lock_timeout=10, stale_after=1)
    _write_lease(store, time.time() - 3600)  # its holder died long ago
    logs = []
    assert not store.get_or_create(KEY, lambda: (_state(), {}), log=logs.append).hit
    assert logs == []  # broken at the first try: no waiting
    assert store._read(_lease_path(store)) is None

    other = "b" * 64
    store._put(_lease_path(store, other), json.dumps({"heartbeat": time.time()}).encode())  # fresh, then silent
    t0 = time.monotonic()
    assert not store.get_or_create(other, lambda: (_state(), {}), log=logs.append).hit
    assert 1 <= time.monotonic() - t0 < 6
    assert len(logs) == 1 and "waiting for another process" in logs[0] and f"locks/{other}.json" in logs[0]


def test_a_live_lease_makes_others_wait_then_hit(url, tmp_path):
    log = tmp_path / "creates.log"
    holder = _worker(url, log, pause=3.0, QBD_LOCK_STALE_AFTER="2")  # heartbeats every 0.5 s, outliving stale_after
    try:
        assert holder.stdout.readline().strip() == "ready"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "creating"
        with pytest.raises(StoreError, match=r"timed out after 0 s waiting for the lock on .*locks/a+\.json"):
            UrlStore(url, lock_timeout=0.4, stale_after=2).get_or_create(KEY, lambda: pytest.fail("held"), log=lambda m: None)
        logs = []
        e = UrlStore(url, lock_timeout=30, stale_after=2).get_or_create(KEY, lambda: pytest.fail("lease is live"), log=logs.append)
        assert e.hit and len(logs) == 1
        assert json.loads(holder.communicate(timeout=60)[0])["hit"] is False
    finally:
        holder.kill()
    assert holder.returncode == 0 and len(log.read_text().split()) == 1


def test_verify_reports_and_quarantines(url):
    store = UrlStore(url)
    good, bad, orphan = "b" * 64, "c" * 64, "d" * 64
    store.save(good, _state(), {})
    store.save(bad, _state(), {})
    store._put(store._path("models", bad, "meta.json"), b"[]")
    weights = store._path("models", orphan, f"weights-{'0' * 64}.safetensors")
    store._put(weights, b"half a model")
    store._put(store._path("models", "stray", "x"), b"?")
    report = store.verify()
    assert report[good] is None
    assert "does not describe this entry" in report[bad]
    assert report[orphan] == ORPHAN and "not a store key" in report["stray"]
    assert store.stale_tmp() == [store._url(weights)]
    assert store.keys() == [good, bad]  # reporting moves nothing
    after = store.verify(quarantine=True)
    assert after == {good: None, bad: report[bad], orphan: ORPHAN, "stray": report["stray"]}
    assert store.entry_names() == [good] and store.stale_tmp() == [] and store.verify() == {good: None}
    moved = store.fs.ls(store._path("quarantine"), detail=False)
    assert len(moved) == 3 and all(store._read(q + "/QUARANTINED") for q in moved)


def test_verify_leaves_an_entry_whose_lease_stays_busy(url):
    store = UrlStore(url, lock_timeout=0.3, stale_after=60)
    store.save(KEY, _state(), {})
    _tamper(store)
    _write_lease(store, time.time() + 30)  # someone is recreating it right now
    report = store.verify(quarantine=True)
    assert report[KEY].endswith("(left in place: its lock stayed busy)") and store.has(KEY)


def test_local_create_only_put_is_atomic(tmp_path):
    """fsspec's local create mode checks, then writes; ours must let exactly one racer win."""
    import threading

    store = UrlStore(tmp_path.as_uri())
    for round_ in range(20):
        path = store._path("race", f"{round_}.json")
        barrier, won = threading.Barrier(6), []

        def racer(i, path=path, barrier=barrier, won=won):
            barrier.wait()
            try:
                store._put(path, str(i).encode() * 1000, create=True)
                won.append(i)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and store.fs.cat_file(path) == str(won[0]).encode() * 1000
    assert not [f for f in store._files("race") if f.endswith(".tmp")]


def _qbd(*args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "QBD_ZOO": "off"}  # train, not the pinned model
    return subprocess.run([sys.executable, "-m", "qbd", *args], capture_output=True, text=True, env=env, timeout=600)


def test_qbd_trains_once_into_a_url_store_and_hits_after(url):
    """The CLI on file:// and on S3: the first `qbd train` trains and publishes, the second loads
    the same entry (a hit, same key and weights), and `qbd store list` / `verify` read it back."""
    args = ("train", "--dataset", "digits", "--epochs", "1", "--min-clean-acc", "0", "--min-asr", "0", "--no-progress",
            "--json", "--cache-dir", url)
    first = _qbd(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _qbd(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert (a["cache"], b["cache"]) == ("miss", "hit")
    assert a["key"] == b["key"] and a["weights"] == b["weights"] and b["weights"].startswith(f"{url}/models/{a['key']}/weights-")
    listed = _qbd("store", "list", "--cache-dir", url)
    assert listed.returncode == 0 and f"{url}: 1 model(s)" in listed.stdout, listed.stdout + listed.stderr
    verified = _qbd("store", "verify", "--cache-dir", url)
    assert verified.returncode == 0 and "1 intact, 0 corrupt" in verified.stdout, verified.stdout + verified.stderr


def test_an_unreachable_store_is_one_line_not_a_traceback(tmp_path):
    import os

    env = {**os.environ, "QBD_ZOO": "off", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1", "AWS_DEFAULT_REGION": "us-east-1"}
    r = subprocess.run([sys.executable, "-m", "qbd", "store", "list", "--cache-dir", "s3://nobucket/x"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("qbd: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_stale_lease_is_broken_by_one_waiter_only(url, monkeypatch):
    """Two waiters saw the same dead lease: the first breaks it and holds the key; the second,
    late, must not delete the first's new lease (its create-only break marker already exists)."""
    a, b = UrlStore(url, stale_after=1), UrlStore(url, stale_after=1)
    path = _lease_path(a)
    dead = json.dumps({"owner": "dead", "heartbeat": time.time() - 3600}).encode()
    a._put(path, dead)
    held = a._try_lease(KEY)
    try:
        assert held is not None and held._mine()
        real_read = b._read
        monkeypatch.setattr(b, "_read", lambda p: dead if p == path else real_read(p))  # b read before a broke it
        assert b._try_lease(KEY) is None
        assert held._mine(), "the late waiter deleted the lease its predecessor holds"
    finally:
        held.release()


def _memory_backend(name, pipe_file):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    cls = type(f"{name}FS", (MemoryFileSystem,), {"protocol": name, "pipe_file": pipe_file})
    fsspec.register_implementation(name, cls, clobber=True)
    return f"{name}://{uuid.uuid4().hex}"


def test_a_backend_ignoring_create_only_writes_is_refused():
    from fsspec.implementations.memory import MemoryFileSystem

    def ignores_mode(self, path, value, mode="overwrite", **kw):
        return MemoryFileSystem.pipe_file(self, path, value, mode="overwrite", **kw)

    store = UrlStore(_memory_backend("qbdnocreate", ignores_mode))
    with pytest.raises(ConfigError, match="ignores create-only writes"):
        store.get_or_create(KEY, lambda: (_state(), {}), log=lambda m: None)
    assert store.keys() == []


def test_conditional_write_conflicts_are_retried_and_412_means_taken():
    """S3 answers 409 to simultaneous conditional writes (retry) and 412 when the object exists;
    a backend that does not map 412 to FileExistsError is still read right."""
    import errno

    from fsspec.implementations.memory import MemoryFileSystem

    calls = {"busy": 0}

    def s3_like(self, path, value, mode="overwrite", **kw):
        if mode == "create" and path.endswith("meta.json") and calls["busy"] < 2:
            calls["busy"] += 1
            raise OSError(errno.EBUSY, "ConditionalRequestConflict")
        if mode == "create" and self.exists(path):
            raise RuntimeError("An error occurred (PreconditionFailed) when calling the PutObject operation")
        return MemoryFileSystem.pipe_file(self, path, value, mode="overwrite", **kw)

    store = UrlStore(_memory_backend("qbds3like", s3_like))
    entry = store.get_or_create(KEY, lambda: (_state(), {}), log=lambda m: None)
    assert not entry.hit and calls["busy"] == 2 and store.keys() == [KEY]
    with pytest.raises(FileExistsError):  # the 412 read as "taken"
        store.save(KEY, _state(1), {})
    assert torch.equal(store.load(KEY).state_dict["w"], _state()["w"])  # the first publisher's entry stands
