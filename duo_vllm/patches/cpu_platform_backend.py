"""Make vLLM's CPU platform honour ``--attention-backend DUO``.

Why: ``CpuPlatform.get_attn_backend_cls`` in vLLM 0.32 ignores the requested backend and always
returns CPU_ATTN (it logs "Cannot use X backend on CPU"), so no out-of-tree backend can be chosen
on CPU. Overriding the CPU_ATTN enum entry instead would hijack every CPU user of vLLM.
How: wrap the classmethod; when DUO is requested (and the layer is a plain decoder attention,
not MLA/sparse) return DUO's class path, otherwise defer to the original unchanged.
Remove when the CPU platform resolves requested backends like the CUDA platform does.
"""

from __future__ import annotations

from duo_vllm.patches.wrapping import MARK as _MARK
from duo_vllm.patches.wrapping import set_attribute


def apply() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from duo_vllm import BACKEND_CLASS_PATH, BACKEND_NAME

        if (
            selected_backend is not None
            and selected_backend.name == BACKEND_NAME
            and not attn_selector_config.use_mla
            and not attn_selector_config.use_sparse
        ):
            return BACKEND_CLASS_PATH
        return original_func(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _MARK, True)
    set_attribute(CpuPlatform, "get_attn_backend_cls", classmethod(get_attn_backend_cls))
