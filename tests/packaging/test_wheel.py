"""The release a defense author installs: the wheel built from this tree, installed into a fresh
environment outside the checkout with a third-party defense package beside it, judges the zoo's
weights (carried in the wheel) and gives the checkout's verdicts, through `qbd run` and pytest.

Offline: the wheels are built without build isolation, installed with --no-deps, and the fresh
environment borrows this one's third-party packages (torch and the rest) through a .pth line, so
nothing is downloaded; qbd itself and the example defense come only from the two wheels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qbd-example-defense"
RUN = ("run", "--dataset", "digits", "--quant", "fp32,int8-dynamic", "--defense", "corner-patch-probe,strip",
       "--protocol", "canonical", "--json", "--no-progress", "-j", "1")


def _pip(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                       capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A fresh environment holding the qbd wheel and the example defense's wheel."""
    tmp = tmp_path_factory.mktemp("release")
    # the tree as it stands (committed or not, ignored files left out), built away from the checkout
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True, cwd=ROOT,
                           check=True).stdout.split()
    src = tmp / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp / "wheels"
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src), str(src / EXAMPLE.relative_to(ROOT)), cwd=tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    _pip("install", "--no-deps", "--target", str(site), *map(str, sorted(wheels.glob("*.whl"))), cwd=tmp)
    # torch, numpy, pytest...: this environment's, after the fresh one's own (whose qbd wins)
    (site / "_borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("QBD_ZOO", "PYTHONPATH")}
    env["QBD_CACHE_DIR"] = str(tmp / "store")
    work = tmp / "elsewhere"  # outside the checkout
    work.mkdir()
    python = venv / "bin" / "python"
    return {"python": str(python), "env": env, "cwd": work, "wheels": wheels, "site": site, "src": src}


def test_the_wheel_carries_the_zoo_and_the_tables(installed: dict[str, object]) -> None:
    (wheel,) = Path(str(installed["wheels"])).glob("pytest_qbd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = json.loads(zipfile.ZipFile(wheel).read("qbd/zoo/weights/manifest.json"))
    assert {f"qbd/zoo/weights/{m['file']}" for m in manifest["models"].values()} <= names
    assert {"qbd/expected/smoke.toml", "qbd/expected/paper.toml", "qbd/schema/result.schema.json"} <= names


def test_the_sdist_carries_the_zoo_the_tables_and_the_license(installed: dict[str, object], tmp_path: Path) -> None:
    """The release workflow builds the wheel from the sdist: a zoo file missing there is missing
    from every wheel built from it."""
    import tarfile

    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
                        str(tmp_path)], capture_output=True, text=True, cwd=str(installed["src"]), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = tmp_path.glob("pytest_qbd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    manifest = json.loads((ROOT / "qbd" / "zoo" / "weights" / "manifest.json").read_text())
    assert {f"qbd/zoo/weights/{m['file']}" for m in manifest["models"].values()} <= names
    assert {"qbd/expected/smoke.toml", "qbd/schema/result.schema.json", "LICENSE", "README.md"} <= names


def test_an_installed_qbd_gives_the_checkouts_verdicts_on_the_zoos_weights(installed: dict[str, object]) -> None:
    python, env, cwd = str(installed["python"]), dict(installed["env"]), installed["cwd"]  # type: ignore[arg-type]
    where = subprocess.run([python, "-c", "import qbd, qbd_example_defense; print(qbd.__file__); print(qbd_example_defense.__file__)"],
                           capture_output=True, text=True, env=env, cwd=cwd, check=True).stdout.split()
    assert all(p.startswith(str(installed["site"])) for p in where), where  # neither from the checkout
    there = subprocess.run([python, "-m", "qbd", *RUN], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    # the checkout, with the example on the path by reference (it is not installed here)
    by_ref = [a.replace("corner-patch-probe", "qbd_example_defense:CornerPatchProbe") for a in RUN]
    here = subprocess.run([sys.executable, "-m", "qbd", *by_ref], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(EXAMPLE)})
    assert there.returncode == here.returncode == 0, there.stderr[-3000:] + here.stderr[-3000:]

    def verdicts(out: str) -> dict[str, tuple]:
        return {r["cell"]: (r["verdict"]["status"], r["verdict"]["target_class"], r["judgement"]["judgement"], r["weights"]["origin"],
                            r["weights"]["sha256"]) for r in json.loads(out)["results"]}

    assert verdicts(there.stdout) == verdicts(here.stdout)
    assert {v[3] for v in verdicts(there.stdout).values()} == {"zoo"} and len(verdicts(there.stdout)) == 8
    assert json.loads(there.stdout)["run"]["defenses"]["corner-patch-probe"] == "qbd-example-defense 0.1.0"


def test_pytest_runs_the_installed_defense_from_the_wheel(installed: dict[str, object]) -> None:
    python, env, cwd = str(installed["python"]), dict(installed["env"]), Path(str(installed["cwd"]))  # type: ignore[arg-type]
    (cwd / "test_qbd.py").write_text("from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401\n")
    r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--qbd-dataset", "digits", "--qbd-scheme",
                        "fp32,int8-dynamic", "--qbd-defense", "corner-patch-probe", "--qbd-protocol", "canonical", "test_qbd.py"],
                       capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "8 passed" in out, out[-3000:]  # 4 cells, 2 audits, 2 attack checks
    assert "the pinned zoo" in out


ALARM = '''
from qbd.defenses.base import Verdict
from qbd_example_defense import CornerPatchProbe


class QuantAlarm(CornerPatchProbe):
    """The example in fp32; on any quantized deployment it flags class 0, backdoored or not."""

    name = "quant-alarm"

    def detect(self, subject, inputs, generator):
        if subject.scheme != "fp32":
            return Verdict("detected", score=1.0, threshold=self.params["capture"], target_class=0)
        return super().detect(subject, inputs, generator)
'''
FALSE_ALARM = "digits:clean/int8-dynamic/quant-alarm[canonical]"


def test_an_installed_qbd_fails_a_false_alarm_once_quantized_unless_the_authors_table_declares_it(
        installed: dict[str, object]) -> None:
    """From the wheel, outside the checkout: the negative control runs on every scheme, so a defense
    quiet on the clean fp32 model that flags the clean int8-dynamic one fails that cell, in `qbd run`
    (exit 1) and in pytest; an author's table that declares it (`--expectations`, on top of the
    shipped table) turns it into a finding and the run passes."""
    python, env, cwd = str(installed["python"]), dict(installed["env"]), Path(str(installed["cwd"]))  # type: ignore[arg-type]
    (cwd / "alarm_defense.py").write_text(ALARM)
    env["PYTHONPATH"] = str(cwd)
    table = cwd / "my.toml"
    table.write_text(f'[cells."{FALSE_ALARM}"]\noutcome = "false-alarm"\nwhy = "flags every quantized model"\n')
    args = ["run", "--dataset", "digits", "--quant", "fp32,int8-dynamic", "--defense", "alarm_defense:QuantAlarm",
            "--protocol", "canonical", "--no-progress", "-j", "1"]
    bare = subprocess.run([python, "-m", "qbd", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    fails = [line for line in bare.stderr.splitlines() if line.startswith("qbd: FAIL")]
    assert bare.returncode == 1 and len(fails) == 1 and fails[0].startswith(f"qbd: FAIL {FALSE_ALARM}: "), bare.stderr[-3000:]
    declared = subprocess.run([python, "-m", "qbd", *args, "--expectations", str(table)], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=900)
    assert declared.returncode == 0, declared.stderr[-3000:]
    assert "3 cells match the truth, 1 declared finding, 0 failing" in declared.stderr, declared.stderr[-3000:]
    (cwd / "test_alarm.py").write_text("from qbd.suite import test_cell  # noqa: F401\n")
    p = subprocess.run([python, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "--qbd-dataset", "digits", "--qbd-scheme",
                        "fp32,int8-dynamic", "--qbd-defense", "alarm_defense:QuantAlarm", "--qbd-protocol", "canonical",
                        "test_alarm.py"], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "1 failed, 3 passed" in out and f"FAILED test_alarm.py::test_cell[{FALSE_ALARM}]" in out, out[-3000:]
