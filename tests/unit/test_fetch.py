"""Untrusted weights (qbd.fetch): `qbd store fetch` and `qbd run --model-file` accept only
sha256-pinned safetensors or weights_only state dicts that fit the architecture, and every
refusal is one line, exit status 2, with nothing left in the store."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from qbd import results as results_io
from qbd.cli import main
from qbd.config import AttackSpec, DatasetSpec, ModelJob
from qbd.fetch import FetchError, Source, fetched_key, read_source
from qbd.models import build_model
from qbd.store import Store

DIGITS = ("--dataset", "digits", "--min-clean-acc", "0", "--min-asr", "0", "--no-progress")


class Evil:
    """A pickle that runs a shell command when unpickled: what a hostile .pt file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    # untrained tiny-cnn weights (seeded): the shapes are what matters here, not the accuracy
    return build_model("tiny-cnn", num_classes, (0.5,) * 3, (0.25,) * 3, seed=0).state_dict()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QBD_CACHE_DIR", str(root))
    return root


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _entry_points(path: Path | str, sha: str) -> dict[str, list[str]]:
    return {
        "store fetch": ["store", "fetch", str(path), "--sha256", sha, *DIGITS],
        "run --model-file": ["run", "--model-file", str(path), "--sha256", sha, "--quant", "fp32", "--defense", "strip",
                             "--protocol", "canonical", "--no-controls", *DIGITS],
    }


def _refused(argv: list[str], capsys, cache: Path, message: str) -> str:
    """Run the CLI in-process: exit 2, one line naming `message`, the store untouched."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert _files(cache) == [], "a refused model left files in the store"
    return err


# -- hostile pickles ------------------------------------------------------------------------------
def _hostile_files(tmp_path: Path, marker: Path) -> list[Path]:
    d = tmp_path / "hostile"
    d.mkdir()
    torch_zip = d / "zip.pt"
    torch.save({"head.weight": Evil(marker)}, torch_zip)  # torch's zip format, payload inside
    legacy = d / "legacy.pth"
    torch.save(Evil(marker), legacy, _use_new_zipfile_serialization=False)
    plain = d / "plain.pt"
    plain.write_bytes(pickle.dumps(Evil(marker)))  # a bare pickle named like a checkpoint
    disguised = d / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps(Evil(marker)))
    return [torch_zip, legacy, plain, disguised]


def test_hostile_payload_runs_when_unpickled_unrestricted(tmp_path):
    """Positive control: each planted file does run its payload under an unrestricted load, so
    the marker's absence below means the loader refused it, not that the payload was inert."""
    marker = tmp_path / "control-marker"
    for path in _hostile_files(tmp_path, marker):
        marker.unlink(missing_ok=True)
        if path.suffix == ".safetensors" or path.name == "plain.pt":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), path.name


@pytest.mark.parametrize("entry", ["store fetch", "run --model-file"])
def test_hostile_pickle_never_executes(entry, tmp_path, cache, capsys):
    marker = tmp_path / "PWNED"
    for path in _hostile_files(tmp_path, marker):
        message = "not a readable safetensors" if path.suffix == ".safetensors" else "refused: not a plain state dict"
        _refused(_entry_points(path, _sha(path))[entry], capsys, cache, message)
        assert not marker.exists(), f"{path.name}: unpickling ran the payload"


def test_hostile_pickle_with_other_suffix_is_not_even_parsed(tmp_path, cache, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Evil(marker)))
    _refused(_entry_points(path, _sha(path))["store fetch"], capsys, cache, "only .safetensors, or a plain state dict")
    # --format pt forces the parse: still the restricted unpickler
    _refused(["store", "fetch", str(path), "--sha256", _sha(path), "--format", "pt", *DIGITS], capsys, cache,
             "torch.load(weights_only=True) rejects it")
    assert not marker.exists()


def test_hostile_pickle_through_the_real_command(tmp_path):
    """The same, as a user meets it: a fresh `qbd` process, whatever torch.load's default is."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    torch.save({"head.weight": Evil(marker)}, path)
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "qbd", *_entry_points(path, _sha(path))["store fetch"]],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "QBD_CACHE_DIR": str(cache)})
    assert r.returncode == 2 and "refused: not a plain state dict" in r.stderr
    assert "weights_only set to `False`" not in r.stderr  # never advise the unsafe load
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not marker.exists() and _files(cache) == []


# -- malformed or mismatched files -------------------------------------------------------------
@pytest.mark.parametrize("entry", ["store fetch", "run --model-file"])
def test_sha256_mismatch_refused(entry, tmp_path, cache, capsys):
    path = _save(tmp_path / "m.safetensors", _state())
    wrong = hashlib.sha256(b"something else").hexdigest()
    _refused(_entry_points(path, wrong)[entry], capsys, cache, f"expected {wrong}; refusing it")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file_refused(suffix, tmp_path, cache, capsys):
    path = _save(tmp_path / f"m{suffix}", _state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    label = "safetensors" if suffix == ".safetensors" else "torch .pt"
    _refused(_entry_points(path, _sha(path))["store fetch"], capsys, cache, f"not a readable {label} weights file")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: _state(num_classes=5), "wrong shape or type: head.bias [5] float32 (expected [10] float32)"),
        (lambda s: {**s, "extra.weight": torch.zeros(3)}, "unexpected keys: extra.weight"),
        (lambda s: {k: v for k, v in s.items() if k != "head.bias"}, "missing keys: head.bias"),
        (lambda s: {**s, "head.bias": torch.full((10,), float("nan"))}, "non-finite values: head.bias"),
        (lambda s: {**s, "head.bias": torch.zeros(10, dtype=torch.int64)}, "wrong shape or type: head.bias"),
    ],
    ids=["wrong-shape", "extra-key", "missing-key", "nan", "int-for-float"],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_must_fit_the_architecture(edit, message, suffix, tmp_path, cache, capsys):
    path = _save(tmp_path / f"m{suffix}", edit(_state()))
    err = _refused(_entry_points(path, _sha(path))["store fetch"], capsys, cache, message)
    assert "does not fit tiny-cnn on digits (10 classes)" in err


def test_not_a_state_dict_refused(tmp_path, cache, capsys):
    path = tmp_path / "m.pt"
    torch.save({"model": _state()}, path)  # a checkpoint wrapper, not a flat state dict
    _refused(_entry_points(path, _sha(path))["store fetch"], capsys, cache, "expected a flat state dict")


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("{tmp}/missing.safetensors", "no such file"),
        ("file://{tmp}/missing.safetensors", "no such file"),
        ("file://elsewhere/m.safetensors", "file:// URLs must name a local file"),
        ("ftp://example.invalid/m.safetensors", "unsupported URL scheme 'ftp'"),
        ("http://127.0.0.1:9/m.safetensors", "cannot fetch http://127.0.0.1:9/m.safetensors"),  # nothing listens on 9
        ("{tmp}/dir.safetensors", "cannot read"),  # a directory
    ],
)
@pytest.mark.parametrize("entry", ["store fetch", "run --model-file"])
def test_unreachable_source_refused(location, message, entry, tmp_path, cache, capsys):
    (tmp_path / "dir.safetensors").mkdir()
    _refused(_entry_points(location.format(tmp=tmp_path), "0" * 64)[entry], capsys, cache, message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["store", "fetch", "m.pt", "--sha256", "abc"], "--sha256 must be 64 hex digits"),
        (["run", "--model-file", "m.pt", *DIGITS], "--model-file needs --sha256"),
        (["run", "--sha256", "0" * 64, *DIGITS], "--sha256 pins a --model-file"),
        (["run", "--model-file", "m.pt", "--sha256", "0" * 64, "--dataset", "digits,synthetic"], "one data set"),
    ],
)
def test_usage_errors(argv, message, cache, capsys):
    _refused(argv, capsys, cache, message)


# -- the happy path -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fetch_stores_a_marked_entry_then_hits(suffix, tmp_path, cache, capsys):
    state = _state()
    path = _save(tmp_path / f"m{suffix}", state)
    sha = _sha(path)
    argv = ["store", "fetch", path.as_uri() if suffix == ".pt" else str(path), "--sha256", sha.upper(), "--json", *DIGITS]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cache"] == "miss" and 0 <= first["clean_acc"] <= 1 and 0 <= first["asr"] <= 1
    assert first["fetched"] == {"source": path.as_uri() if suffix == ".pt" else str(path.resolve()), "sha256": sha,
                                "format": "safetensors" if suffix == ".safetensors" else "pt",
                                "bytes": path.stat().st_size}
    store = Store(cache)
    assert store.keys() == [first["key"]]
    entry = store.load(first["key"])
    assert entry.meta["job"]["train"] is None and entry.meta["fetched"]["sha256"] == sha
    assert all(torch.equal(entry.state_dict[k], v) for k, v in state.items())
    # its own key: never the key a trained job would use
    job = ModelJob(dataset=DatasetSpec("digits"), attack=AttackSpec())
    from qbd.data import load_dataset

    fp = load_dataset(job.dataset, None).fingerprint()
    assert first["key"] == fetched_key(job, sha, fp) != job.key(fp)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "hit"

    assert main(["store", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["key"], r["kind"]) for r in rows] == [(first["key"], "fetched")]
    assert main(["store", "verify"]) == 0
    assert "1 intact, 0 corrupt" in capsys.readouterr().out


def test_corrupt_fetched_entry_is_refused_not_recreated(tmp_path, cache, capsys):
    path = _save(tmp_path / "m.safetensors", _state())
    argv = ["store", "fetch", str(path), "--sha256", _sha(path), "--json", *DIGITS]
    assert main(argv) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    weights = Store(cache).entry_dir(key) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    assert main(["store", "verify"]) == 1
    assert f"{key}: store entry {key}: weights sha256" in capsys.readouterr().out

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "fetched weights are never recreated automatically" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert Store(cache).keys() == []  # quarantined, and nothing put in its place
    assert len(list((cache / "quarantine").iterdir())) == 1
    # fetching it again (the pinned file is still there) restores it
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["key"] == key


def test_verify_quarantines_corrupt_entries(tmp_path, cache, capsys):
    path = _save(tmp_path / "m.safetensors", _state())
    assert main(["store", "fetch", str(path), "--sha256", _sha(path), "--json", *DIGITS]) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    (Store(cache).entry_dir(key) / "meta.json").write_text("{not json")
    assert main(["store", "verify", "--quarantine"]) == 1
    assert "quarantined" in capsys.readouterr().out
    assert Store(cache).keys() == []
    assert main(["store", "verify"]) == 0


def test_run_with_model_file_end_to_end(tmp_path):
    """`qbd run --model-file`: the fetched weights are the model under test (no training). They
    are the digits model backdoored with the default BadNet (target 0), taken from the shared
    store, so the truth is known: its ASR is the trained model's, and STRIP names target 0."""
    trained = subprocess.run([sys.executable, "-m", "qbd", "train", *DIGITS, "--json"], capture_output=True, text=True,
                             timeout=600, check=True)  # the shared store's model (QBD_CACHE_DIR): trained there once
    trained = json.loads(trained.stdout)
    path = tmp_path / "m.safetensors"
    path.write_bytes(Path(trained["weights"]).read_bytes())
    cache = tmp_path / "cache"
    r = subprocess.run(
        [sys.executable, "-m", "qbd", *_entry_points(path, _sha(path))["run --model-file"], "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "QBD_CACHE_DIR": str(cache)},
    )
    assert r.returncode == 0, r.stderr
    assert ": fetched now, stored" in r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert res["cell"] == "digits/fp32/strip[canonical]" and res["model"] == "tiny-cnn"
    assert abs(res["asr"] - trained["asr"]) <= 0.02 and trained["asr"] > 0.9  # the planted backdoor came with the file
    # the truth: detected naming the planted target (the shipped smoke table declares no finding for this cell)
    assert (res["verdict"]["status"], res["verdict"]["target_class"]) == ("detected", 0), res["verdict"]
    assert (res["judgement"]["outcome"], res["judgement"]["judgement"]) == ("pass", "pass")
    assert res["weights"]["origin"] == "fetched" and res["weights"]["sha256"] == _sha(path)  # the Result says whose model
    assert results_io.problems(res) == []
    store = Store(cache)
    (key,) = store.keys()  # only the fetched model: nothing was trained
    assert store.read_meta(key)["fetched"]["sha256"] == _sha(path)


# -- downloads: streamed to a temporary file, hashed as they arrive, capped ------------------------
@dataclass
class Route:
    """What the test server sends for one path: `body` in `chunk`-sized writes, with or without a
    Content-Length (`declare`: True, False, or a number to lie with); `before(offset)` runs
    before each write. `sent` counts what reached the socket; `ended` is set when it stops."""

    body: bytes
    chunk: int = 64 << 10
    declare: bool | int = True
    before: Callable[[int], None] | None = None
    sent: int = 0
    ended: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)  # type: ignore[attr-defined]
        if route is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            if route.declare is not False:
                self.send_header("Content-Length", str(len(route.body) if route.declare is True else route.declare))
            self.end_headers()
            for offset in range(0, len(route.body), route.chunk):
                if route.before is not None:
                    route.before(offset)
                self.wfile.write(route.body[offset:offset + route.chunk])
                self.wfile.flush()
                route.sent += len(route.body[offset:offset + route.chunk])
        except (BrokenPipeError, ConnectionResetError):  # the client hung up: what the cap does
            pass
        finally:
            route.ended.set()

    def log_message(self, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def server():
    """A local HTTP server in a thread: `server.routes[path] = Route(...)`, `server.url(path)`."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.routes = {}
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """Where read_source puts its partial download (tempfile's directory), empty to start with."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _source(url: str, body: bytes) -> Source:
    return Source(url, hashlib.sha256(body).hexdigest())


def test_a_download_streams_to_a_temporary_file_and_returns_the_verified_bytes(server, temp_dir, capsys):
    body = os.urandom(3 << 20)
    half = len(body) // 2
    seen: list[int] = []

    def pause_at_half(offset: int) -> None:
        # the server holds back the second half until the first is on disk, in the temporary file
        if offset == half:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                sizes = [p.stat().st_size for p in temp_dir.glob("qbd-fetch-*.part")]
                if sizes and sizes[0] > 0:
                    seen.append(sizes[0])
                    return
                time.sleep(0.01)

    server.routes["/m.safetensors"] = Route(body, before=pause_at_half)
    assert read_source(_source(server.url("/m.safetensors"), body)) == body
    assert seen and 0 < seen[0] <= half, seen  # written while the download was still under way
    assert list(temp_dir.iterdir()) == []
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar, and no log given


@pytest.mark.parametrize("declare", [False, True], ids=["undeclared", "declared"])
def test_the_size_cap_stops_a_download_at_once(server, temp_dir, declare):
    """Over the cap, the download ends: after the first chunk past it (no size given), or before
    the body (a declared Content-Length over the cap). The rest is never read."""
    body = bytes(64 << 20)
    server.routes["/big.pt"] = Route(body, declare=declare)
    with pytest.raises(FetchError, match="larger than 1048576 bytes" + (r" \(67108864 declared\)" if declare else "")):
        read_source(_source(server.url("/big.pt"), body), max_bytes=1 << 20)
    assert server.routes["/big.pt"].ended.wait(20)
    assert server.routes["/big.pt"].sent < len(body) // 4  # only what the socket buffers held when the client hung up
    assert list(temp_dir.iterdir()) == []


def test_a_wrong_sha256_is_refused_and_nothing_is_left(server, temp_dir):
    body = b"weights" * 1000
    server.routes["/m.pt"] = Route(body)
    wrong = hashlib.sha256(b"other").hexdigest()
    url = server.url("/m.pt")
    with pytest.raises(FetchError, match=f"{url}: sha256 is {hashlib.sha256(body).hexdigest()}, expected {wrong}; refusing it"):
        read_source(Source(url, wrong))
    assert list(temp_dir.iterdir()) == []


def test_a_connection_closed_early_is_refused(server, temp_dir):
    body = b"x" * 10_000
    server.routes["/short.pt"] = Route(body, declare=20_000)  # promises more than it sends
    with pytest.raises(FetchError, match="the connection closed after 10000 of 20000 bytes"):
        read_source(_source(server.url("/short.pt"), body))
    assert list(temp_dir.iterdir()) == []


def test_an_interrupted_download_leaves_no_temporary_file(server, temp_dir, monkeypatch):
    from qbd import fetch

    body = bytes(1 << 20)
    server.routes["/m.pt"] = Route(body)

    def interrupt(self: Any, n: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch._Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        read_source(_source(server.url("/m.pt"), body))
    assert list(temp_dir.iterdir()) == []


def test_a_redirected_log_gets_one_start_and_one_end_line(server, temp_dir, capsys):
    body = os.urandom(3 << 20)
    server.routes["/m.pt"] = Route(body)
    lines: list[str] = []
    url = server.url("/m.pt")
    assert read_source(_source(url, body), log=lines.append) == body
    assert len(lines) == 2, lines
    assert lines[0] == f"fetching {url} ({len(body)} bytes)"
    assert lines[1].startswith(f"fetched {url}: {len(body)} bytes in ")
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_progress_bar(server, temp_dir, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    body = os.urandom(2 << 20)
    server.routes["/m.safetensors"] = Route(body)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    lines: list[str] = []
    assert read_source(_source(server.url("/m.safetensors"), body), log=lines.append) == body
    assert "fetching m.safetensors" in term.getvalue() and "2.00M" in term.getvalue()
    assert lines == []  # the bar replaces the lines


def test_fetch_over_http_stores_the_model(server, temp_dir, cache, capsys, tmp_path):
    path = _save(tmp_path / "m.safetensors", _state())
    server.routes["/m.safetensors"] = Route(path.read_bytes())
    url = server.url("/m.safetensors")
    assert main(["store", "fetch", url, "--sha256", _sha(path), "--json", *DIGITS]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fetched"] == {"source": url, "sha256": _sha(path), "format": "safetensors", "bytes": path.stat().st_size}
    assert list(temp_dir.iterdir()) == []


def test_a_hostile_download_with_a_wrong_sha256_is_never_parsed(server, temp_dir, cache, capsys, tmp_path):
    """The hash is checked before any parser sees the bytes: a wrong pin refuses even a file the
    restricted unpickler would have refused anyway, and nothing runs."""
    marker = tmp_path / "PWNED"
    server.routes["/m.pt"] = Route(pickle.dumps(Evil(marker)))
    _refused(["store", "fetch", server.url("/m.pt"), "--sha256", "0" * 64, *DIGITS], capsys, cache, "; refusing it")
    assert not marker.exists() and list(temp_dir.iterdir()) == []
