"""Run Python with a vLLM that lacks an attribute, or reports another version, in every process.

What a user meets when a vLLM release moves an internal duo-vllm patches (or is outside the
supported range) cannot be shown in-process: vLLM loads plugins once per process, and its engine
core and workers are processes of their own. A ``sitecustomize.py`` on ``PYTHONPATH`` installs an
import hook that edits the named modules right after they load, in the test's subprocess and in
every process that one starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers.engine import vllm_env_defaults

_SITECUSTOMIZE = '''
import importlib.abc
import os
import sys

import types

_EDITS = {}


def _hide(module, attribute):
    # The name leaves the module's public face (``module.name``, ``from module import name``), as
    # when vLLM moves a function, while the module's own code, which reads its globals directly,
    # keeps working: vLLM still runs, a plugin looking for the name does not find it.
    hidden = set(getattr(type(module), "_hidden", ())) | {attribute}

    class _Hiding(types.ModuleType):
        _hidden = hidden

        def __getattribute__(self, name):
            if name in hidden:
                raise AttributeError(f"module {types.ModuleType.__getattribute__(self, '__name__')!r} "
                                     f"has no attribute {name!r}")
            return types.ModuleType.__getattribute__(self, name)

    module.__class__ = _Hiding


for item in filter(None, os.environ.get("DUO_TEST_HIDE", "").split(",")):
    module, attribute = item.split(":")
    _EDITS.setdefault(module, []).append(lambda m, a=attribute: _hide(m, a))
if os.environ.get("DUO_TEST_VLLM_VERSION"):
    _EDITS.setdefault("vllm", []).append(
        lambda m: setattr(m, "__version__", os.environ["DUO_TEST_VLLM_VERSION"]))


class _EditAfterLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _EDITS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def edited(module):
            exec_module(module)
            for edit in _EDITS[name]:
                edit(module)

        spec.loader.exec_module = edited
        return spec


sys.meta_path.insert(0, _EditAfterLoad())
'''


def run_edited(args: list[str], *, hide: tuple[str, ...] = (), version: str | None = None,
               timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` (``python`` is this interpreter) with ``hide`` ("module:attribute" each)
    gone from the module's public face (its own code still sees it) and vLLM's ``__version__`` set to ``version``, in that process and its children."""
    with tempfile.TemporaryDirectory(prefix="duo-surgery-") as site:
        Path(site, "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env = {**os.environ, **vllm_env_defaults(os.path.join(site, "cache"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.getcwd(), env.get("PYTHONPATH")]))
        env["DUO_TEST_HIDE"] = ",".join(hide)
        env["DUO_TEST_VLLM_VERSION"] = version or ""
        env.pop("DUO_VLLM_STOOD_ASIDE", None)
        if args and args[0] == "python":
            args = [sys.executable, *args[1:]]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
