"""Finding the flows a rehearsal runs: ``mailproof rehearse -f FLOWS``.

FLOWS is a Python file (``examples/flask_shop/loadflows.py``) or an importable module
(``myapp.loadflows``). A file inside a package (its folder and the folders above hold
``__init__.py``) is imported under its dotted name from the top of that package, so its relative
imports work (``from . import shop``); a file outside any package is imported from its folder.

The flows of a module are its ``@flow`` functions: those named in its ``__all__`` when it has
one, else those defined in it (a flow imported from elsewhere, e.g. a helper flow another flow
calls, is not a task of this module unless ``__all__`` names it). Each is a Locust task of
weight ``@flow(weight=N)`` (default 1), or ``--flow-mix name=W,...``.

A rehearsal calls each flow with the flow object only: a flow whose other parameters have no
default (``def f(flow, faults)``) cannot run under load and is skipped, with a note saying so.

No Locust import here: the ``mailproof`` command checks FLOWS before it starts anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mailproof.flow import flow_info


class FlowsError(Exception):
    """FLOWS cannot be used: the message names the cause and the fix."""


@dataclass
class LoadedFlows:
    source: str  # FLOWS as given
    module: str  # the module's name
    flows: dict[str, Callable] = field(default_factory=dict)  # name -> function, in module order
    weights: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it cannot run under load

    def mix(self, text: str = "") -> dict[Callable, int]:
        """{function: weight} from ``--flow-mix`` text (every flow at its own weight when empty)."""
        weights = parse_mix(text, list(self.flows), self.skipped) if text else dict(self.weights)
        return {self.flows[name]: weight for name, weight in weights.items() if weight > 0}

    def notes(self) -> list[str]:
        return [f"flow {name} not run: {why}" for name, why in self.skipped.items()]


def weight_of(fn: Callable) -> int:
    """The flow's task weight: ``@flow(weight=N)`` (FlowInfo.weight), 1 for an undecorated function."""
    weight = flow_info(fn).weight
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise FlowsError(f"flow {flow_info(fn).name}: weight must be a whole number of at least 0, not {weight!r}")
    return weight


def parse_mix(text: str, names: list[str], skipped: Optional[dict[str, str]] = None) -> dict[str, int]:
    """``'signup=3,order=1'`` -> {"signup": 3, "order": 1}; FlowsError names a bad item."""
    mix: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, weight = (s.strip() for s in part.partition("="))
        if name not in names:
            why = f" ({skipped[name]})" if skipped and name in skipped else ""
            raise FlowsError(f"--flow-mix: unknown flow {name!r}{why}; the flows are: {', '.join(names)}")
        try:
            value = int(weight) if sep else 1
        except ValueError:
            value = -1
        if value < 0:
            raise FlowsError(f"--flow-mix: {part!r}: the weight must be a whole number, e.g. {name}=3")
        mix[name] = value
    if not any(mix.values()):
        raise FlowsError(f"--flow-mix {text!r} gives every flow weight 0: nothing would run")
    return mix


def _package_root(path: Path) -> tuple[Path, str]:
    """(folder to put on sys.path, dotted module name) for a .py file."""
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return folder, ".".join(parts)


def _import(source: str) -> object:
    path = Path(source)
    looks_like_path = source.endswith(".py") or "/" in source or path.exists()
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # what `python -m` gives: the flows' own imports from here work
    try:
        if looks_like_path:
            if not path.is_file():
                raise FlowsError(f"-f {source}: no such file. Give a Python file of @flow functions "
                                 "(e.g. -f examples/flask_shop/loadflows.py) or an importable module name.")
            root, name = _package_root(path.resolve())
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "") or "").resolve() != path.resolve():
                raise FlowsError(f"-f {source}: the module name {name!r} is already taken by "
                                 f"{sys.modules[name].__file__}; rename the file or put it in a package")
            return importlib.import_module(name)
        return importlib.import_module(source)
    except FlowsError:
        raise
    except ModuleNotFoundError as exc:
        itself = not looks_like_path and exc.name is not None and (source == exc.name
                                                                   or source.startswith(exc.name + "."))
        if itself:
            raise FlowsError(f"-f {source}: no module named {source!r}. Give a file path (ending in .py) or a "
                             "module importable from the current folder.") from None
        raise FlowsError(f"-f {source}: importing it failed: {exc}. Install the missing module, or run "
                         "from the folder its imports expect (the current folder is on the import path).") from None
    except Exception as exc:  # the user's module raised while importing: show where
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise FlowsError(f"-f {source}: importing it raised {type(exc).__name__}: {exc} "
                         f"(at {where.filename}:{where.lineno}). Fix the module.") from None


def _runs_with_flow_only(fn: Callable) -> Optional[str]:
    """None when ``fn(flow)`` is a valid call, else why not."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return "it takes no flow argument"
    missing = [p.name for p in params[1:] if p.default is p.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        return (f"it needs {', '.join(missing)}, which a rehearsal cannot give (a rehearsal calls a flow with "
                "the flow object only; give the parameter a default, or wrap the flow)")
    return None


def load_flows(source: str) -> LoadedFlows:
    """Import FLOWS and collect its flows; FlowsError (cause and fix) when there is none to run."""
    module = _import(source)
    name = module.__name__
    exported = getattr(module, "__all__", None)
    if exported is not None:
        candidates = [(n, getattr(module, n, None)) for n in exported]
    else:
        candidates = list(vars(module).items())
    loaded = LoadedFlows(source=source, module=name)
    for attr, fn in candidates:
        if not callable(fn) or getattr(fn, "__mailproof_flow__", None) is None:
            continue
        if exported is None and getattr(fn, "__module__", None) != name:
            continue  # imported from elsewhere: a helper, not one of this module's tasks
        info = flow_info(fn)
        why = _runs_with_flow_only(fn)
        if why is not None:
            loaded.skipped[info.name] = why
            continue
        loaded.flows[info.name] = fn
        loaded.weights[info.name] = weight_of(fn)
    if not loaded.flows:
        if loaded.skipped:
            raise FlowsError(f"-f {source}: none of its flows can run under load: "
                             + "; ".join(f"{n}: {why}" for n, why in loaded.skipped.items()))
        raise FlowsError(f"-f {source}: no @flow function in module {name!r}. Decorate the flows with "
                         "`@flow` (from mailproof import flow)" + (" or list them in __all__" if exported is None
                                                                   else "; its __all__ names none"))
    if not any(loaded.weights.values()):
        raise FlowsError(f"-f {source}: every flow has weight 0: nothing would run")
    return loaded
