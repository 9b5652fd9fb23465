"""A run's metadata, for report.md's header and results.json's "run": versions, platform,
command line, tier, model, attack, seeds, device, expectations, date; what a caller does not say is
taken from the Results (run_facts) and this process (run_metadata). Torch-free."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qbd.tables import seeds_text

# -- run metadata -------------------------------------------------------------------------------------
# the order report.md's header lists them in; a caller's other keys follow
RUN_FIELDS = ("command", "tier", "model", "defenses", "attack", "seeds", "device", "expectations", "versions", "platform", "date")


def run_metadata(**fields: Any) -> dict[str, Any]:
    """The run's metadata, for report.md's header and results.json's "run": the caller's fields
    (command, tier, model, attack, seeds, device, expectations, or any other JSON-able value) and,
    where one is absent or None, this process's command line, versions, platform and the date."""
    out = {k: _plain(v) for k, v in fields.items()}
    defaults = {"command": _command_line, "versions": _versions, "platform": _platform, "date": _now}
    for key, default in defaults.items():
        if out.get(key) is None:
            out[key] = default()
    return out


def run_facts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What the Results themselves say about their run: tier, model, attack specs (without the
    per-model attack seed), model seeds and device (where they record their placement)."""
    def distinct(values: Iterable[Any]) -> str | None:
        vs = sorted({str(v) for v in values if v is not None})
        return ", ".join(vs) if vs else None

    attacks: list[dict[str, Any]] = []
    for r in results:
        a = {k: v for k, v in (r.get("attack") or {}).items() if k != "seed"}
        if a and a not in attacks:
            attacks.append(a)
    if not results:
        return {}
    # which release of each defense produced the verdicts (a third-party defense's own version)
    defenses = {r["defense"]["name"]: (f"{d['name']} {d['version']}" if (d := r["defense"].get("distribution")) else "not installed")
                for r in results if isinstance(r.get("defense"), dict) and "distribution" in r["defense"]}
    facts = {"tier": distinct(r.get("tier") for r in results), "model": distinct(r.get("model") for r in results),
             "defenses": dict(sorted(defenses.items())) or None,
             "attack": attacks, "seeds": sorted({int(r.get("seed", 0)) for r in results}),
             "device": distinct((r.get("placement") or {}).get("device") for r in results)}
    return {k: v for k, v in facts.items() if v is not None}


def _plain(v: Any) -> Any:
    """JSON-ready: paths as text, tuples as lists."""
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _command_line() -> str:
    """This process's command line as typed: `qbd run ...`, `pytest ...`, `python -m qbd run ...`."""
    import shlex
    import sys

    if not sys.argv or not sys.argv[0]:
        return ""
    prog = Path(sys.argv[0])
    head = ["python", "-m", prog.parent.name] if prog.name == "__main__.py" else [prog.name]
    return shlex.join([*head, *sys.argv[1:]])


def _versions() -> dict[str, str]:
    """Read from the installed distributions: the report stays torch-free."""
    import platform
    from importlib import metadata

    from qbd import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    # the libraries a verdict depends on (kernels, quantization flows, clustering, SVD)
    libs = ("torch", "torchvision", "torchao", "numpy", "scipy", "scikit-learn")
    return {"qbd": __version__, **{lib: version(lib) for lib in libs}, "python": platform.python_version(),
            "qbd_source": _source()}


def _source() -> str:
    """Which qbd ran: a git checkout's commit, and whether its files differ from it (modified or
    new, outside out/ and docs/; a version number does not change between commits), else
    "installed"."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "installed"
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        # tracked files modified anywhere, and new files where a run reads them (code, tables, the zoo)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=all", "--", ".", ":(exclude)out", ":(exclude)docs"],
                               capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "a git checkout (git could not say which commit)"
    return f"git {head.stdout.strip()}" + (" with uncommitted changes" if dirty.stdout.strip() else "")


def _platform() -> dict[str, Any]:
    import platform

    return {"os": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere, often empty)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def describe_attack(attack: Any) -> str:
    """"badnet: target 0, white 3x3 trigger at bottom-right, 10 % poisoned" for an attack spec
    (a list of specs joined by "; "; none: "none (clean models only)")."""
    if isinstance(attack, list):
        return "; ".join(describe_attack(a) for a in attack) or "none (clean models only)"
    if not isinstance(attack, dict):
        return "none (clean models only)" if attack is None else str(attack)
    a = attack
    try:
        size = a["trigger_size"]
        return (f"{a['name']}: target {a['target']}, {a['trigger_pattern']} {size}x{size} trigger at {a['trigger_position']},"
                f" {100 * a['poison_rate']:g} % poisoned")
    except (KeyError, TypeError):  # a spec of another shape: its fields as they are
        return ", ".join(f"{k}={v}" for k, v in a.items())


def run_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of report.md's run block: the known fields in order, then the others."""
    def text(key: str, v: Any) -> str:
        if key == "attack":
            return describe_attack(v)
        if key == "seeds" and isinstance(v, list) and all(isinstance(x, int) for x in v):
            return seeds_text(v) if v else "-"
        if key == "command" and v and "`" not in str(v):
            return f"`{v}`"
        if key == "expectations" and v is None:
            return "none: every cell judged against the truth alone"
        if key == "platform" and isinstance(v, dict):
            return ", ".join(str(x) for x in (v.get("os"), v.get("machine"), v.get("cpu")) if x) + (
                f" ({v['cpu_count']} CPUs)" if v.get("cpu_count") else "")
        if isinstance(v, dict):
            return ", ".join(f"{k} {x}" for k, x in v.items())
        return "-" if v is None else str(v)

    keys = [k for k in RUN_FIELDS if k in run] + [k for k in run if k not in RUN_FIELDS]
    return ["run", ""], [[k, text(k, run[k])] for k in keys]


