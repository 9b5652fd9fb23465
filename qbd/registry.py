"""One small name -> object registry, shared by datasets, models, schemes and defenses.

An entry may be the object itself or a lazy reference "package.module:attr", imported on first
`get`. Lazy entries let the CLI and the pytest plugin list names without importing torch.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps CLI names to objects. Names are listed sorted so that every xdist worker
    parametrizes from the same order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def add_lazy(self, name: str, ref: str) -> None:
        """Register "package.module:attr", imported on first use."""
        if ":" not in ref:
            raise ValueError(f"lazy reference {ref!r} must look like 'package.module:attr'")
        self.add(name, _Lazy(ref))  # type: ignore[arg-type]

    def get(self, name: str) -> T:
        try:
            obj = self._items[name]
        except KeyError:
            raise UnknownNameError(unknown_message(self.kind, name, self.names())) from None
        if isinstance(obj, _Lazy):
            obj = obj.resolve()
            self._items[name] = obj
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


class _Lazy:
    __slots__ = ("ref",)

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def resolve(self) -> object:
        return load_ref(self.ref)


def load_ref(ref: str) -> object:
    """Import "package.module:attr" (attr may be dotted)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{ref!r} is not of the form 'package.module:attr'")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def source_digest(module: object) -> str | None:
    """sha256 of a module's code: every file under its folder for a package (data files included:
    a threshold table shipped beside the code counts), its file for a plain module; None when it has
    no source file (defined in a string, a notebook, a C extension)."""
    import hashlib
    from pathlib import Path

    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file)
    files = ([f for f in sorted(path.parent.rglob("*")) if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
             if path.name == "__init__.py" else [path])
    h = hashlib.sha256()
    try:
        for f in files:
            h.update(f.relative_to(path.parent).as_posix().encode() + b"\x00" + f.read_bytes())
    except OSError:
        return None
    return h.hexdigest()


def code_digest(obj: object) -> str | None:
    """source_digest of the top-level package that defines `obj`'s class (or `obj`, a class)."""
    import sys

    cls = obj if isinstance(obj, type) else type(obj)
    module = sys.modules.get(cls.__module__.split(".")[0])
    return None if module is None else source_digest(module)


def load_entry(kind: str, entry: Available) -> object:
    """An entry point's object, a class instantiated with no arguments; ConfigError naming its
    distribution when it cannot be loaded, whatever it raised (someone else's package)."""
    from qbd.errors import ConfigError

    try:
        obj = load_ref(entry.ref)
        return obj() if isinstance(obj, type) else obj
    except Exception as e:
        raise ConfigError(f"{kind} {entry.name!r} of the {entry.origin} ({entry.ref}): cannot load it"
                          f" ({type(e).__name__}: {e})") from None


def suggestion(name: str, valid: list[str]) -> str | None:
    """The valid name the user most likely meant: a close spelling ("papr" -> "paper"), the
    initials of a hyphenated name ("nc" -> "neural-cleanse"), or a unique prefix."""
    key = name.strip().lower()
    initials = [v for v in valid if "-" in v and "".join(p[0] for p in v.split("-") if p) == key]
    prefixed = [v for v in valid if v.startswith(key)] if key else []
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    for candidates in (initials, close, prefixed):
        if len(candidates) == 1:
            return candidates[0]
    return None


def unknown_message(kind: str, name: str, valid: list[str]) -> str:
    """ "unknown defense 'nc' (did you mean 'neural-cleanse'?); valid: ..." """
    hint = suggestion(name, valid)
    return f"unknown {kind} {name!r}" + (f" (did you mean {hint!r}?)" if hint else "") + f"; valid: {', '.join(valid) or '(none)'}"


@dataclass(frozen=True)
class Available:
    """A catalog entry the user can name: `ref` is what loads it (a built-in name or
    "module:attr"); `origin` says where it came from ("built-in", or the distribution of an entry
    point)."""

    name: str
    ref: str
    origin: str = "built-in"

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"


def installed(kind: str, group: str, builtin: tuple[str, ...]) -> list[Available]:
    """The built-ins, then the `group` entry points, sorted by name. Reads package metadata and
    imports nothing. An entry point that shadows a built-in, repeats another's name or is malformed
    is skipped with a warning naming its distribution, never an error: someone else's broken
    package must not stop a run that does not name it."""
    from importlib.metadata import entry_points

    out = {n: Available(n, n) for n in builtin}
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an unknown distribution"
        problem = (f"its name is a built-in {kind}'s" if ep.name in builtin
                   else f"another entry point ({out[ep.name].origin}) has that name" if ep.name in out
                   else "its value is not 'module:attr'" if ":" not in ep.value else None)
        if problem:
            warnings.warn(f"qbd: skipped the {group} entry point {ep.name!r} = {ep.value!r} of {dist}: {problem}", stacklevel=3)
            continue
        out[ep.name] = Available(ep.name, ep.value, f"entry point of {dist}")
    return sorted(out.values(), key=lambda a: a.name)


def distribution_of(obj: object, group: str) -> dict[str, str] | None:
    """The installed distribution that provides `obj`'s class, {"name", "version"}, for the record
    (a Result says which release of a defense produced it): the distribution of the `group` entry
    point naming its module, else the one whose files hold its top-level package, else None (a
    module on sys.path that no distribution installed)."""
    from importlib import metadata

    module = type(obj).__module__
    top = module.partition(".")[0]
    if top == "qbd":
        from qbd import __version__

        return {"name": "pytest-qbd", "version": __version__}
    for ep in metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        if dist is not None and ep.value.partition(":")[0] == module:
            return {"name": dist.name, "version": dist.version}
    # a distribution that installed a package of that name is not proof: the module imported may be
    # a local file shadowing it, so the distribution must list the very file
    import sys
    from pathlib import Path

    where = getattr(sys.modules.get(module), "__file__", None)
    for name in metadata.packages_distributions().get(top) or []:
        dist = metadata.distribution(name)
        if where and any(Path(str(dist.locate_file(f))).resolve() == Path(where).resolve() for f in dist.files or ()):
            return {"name": dist.metadata["Name"], "version": dist.version}
    return None
