"""Reorder DUO layers' attention heads (retrieval first) when the model's weights are loaded.

Why: kernels then read each layer's retrieval heads as a slice instead of gathering them and
scattering their output at every step (``duo_vllm.head_order``). vLLM 0.32 has no hook between
"weights loaded" and "weights post-processed" (on CPU, post-processing packs the linear weights
for oneDNN and drops the originals, so the reordering must come first), and none after an
in-place weight reload.
How: wrap ``model_loader.utils.process_weights_after_loading``, also under the name
``base_loader`` imported it (the one caller of the load path every loader shares), to reorder
first. In-place weight updates (``GPUModelRunner.reload_weights``, the weight-transfer engine's
``Worker._start_weight_update``; the CPU classes inherit both) would write the checkpoint's
head order over reordered heads: they are refused with a message naming the fix
(``"reorder_heads": false``). Models without DUO layers are untouched.
Remove when vLLM gives attention backends a post-load hook with the model.
"""

from __future__ import annotations

from duo_vllm.patches.wrapping import wrap_function


def apply() -> None:
    from vllm.model_executor.model_loader import base_loader, utils

    def wrap_process(original):
        def process_weights_after_loading(model, model_config, target_device):
            from duo_vllm.head_order import reorder_model_heads

            if reorder_model_heads(model):
                _refuse_weight_updates()
            return original(model, model_config, target_device)

        return process_weights_after_loading

    wrap_function(utils, "process_weights_after_loading", wrap_process, also=(base_loader,))


def _refuse_weight_updates() -> None:
    # Installed here, in the process that loaded a reordered model, where the worker modules are
    # already imported (importing them in every process would cost each one seconds).
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    def refuse_when_reordered(get_model):
        def make_wrapper(original):
            def wrapper(self, *args, **kwargs):
                from duo_vllm.head_order import refuse_weight_update

                refuse_weight_update(get_model(self))
                return original(self, *args, **kwargs)

            return wrapper

        return make_wrapper

    wrap_function(GPUModelRunner, "reload_weights", refuse_when_reordered(lambda runner: runner.get_model()))
    wrap_function(Worker, "_start_weight_update",
                  refuse_when_reordered(lambda worker: worker.model_runner.get_model()))
