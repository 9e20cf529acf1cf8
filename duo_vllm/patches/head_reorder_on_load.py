"""Reorder DUO layers' attention heads (retrieval first) when the model's weights are loaded.

Why: kernels then read each layer's retrieval heads as a slice instead of gathering them and
scattering their output at every step (``duo_vllm.head_order``). vLLM 0.32 has no hook between
"weights loaded" and "weights post-processed" (on CPU, post-processing packs the linear weights
for oneDNN and drops the originals, so the reordering must come first), and none after an
in-place weight reload.
How: wrap ``model_loader.utils.process_weights_after_loading``, also under the name
``base_loader`` imported it (the one caller of the load path every loader shares), to reorder
first. In-place weight updates (``Worker.reload_weights``, the weight-transfer engine's
``Worker._start_weight_update``; the CPU worker inherits both) would write the checkpoint's
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
            from duo_vllm.head_order import refuse_weight_update, reorder_model_heads

            # Post-processing a model whose heads are already reordered means new weights were
            # written into it in place (vLLM 0.34's direct reload mode runs this again on the live
            # model): they came in the checkpoint's order, so refuse rather than serve wrong heads.
            refuse_weight_update(model)
            if reorder_model_heads(model):
                try:
                    _refuse_weight_updates()
                except Exception as exc:  # a vLLM outside what vllm_support checked: say so
                    raise RuntimeError(
                        f"DUO reordered this model's attention heads but cannot guard in-place weight "
                        f"updates on this vLLM ({type(exc).__name__}: {exc}); serve with "
                        "--additional-config '{\"duo\": {\"reorder_heads\": false}}'.") from exc
            return original(model, model_config, target_device)

        return process_weights_after_loading

    wrap_function(utils, "process_weights_after_loading", wrap_process, also=(base_loader,))


def _refuse_weight_updates() -> None:
    # Installed here, in the process that loaded a reordered model, where the worker module is
    # already imported (importing it in every process would cost each one seconds). The worker,
    # not the model runner, is the choke point: on CUDA vLLM 0.32/0.33 run the V2 runner (no
    # subclass of the V1 GPUModelRunner, which 0.34 removes), and the CPU worker inherits both.
    from vllm.v1.worker.gpu_worker import Worker

    def refuse_when_reordered(original):
        def wrapper(self, *args, **kwargs):
            from duo_vllm.head_order import refuse_weight_update

            refuse_weight_update(self.model_runner.get_model())
            return original(self, *args, **kwargs)

        return wrapper

    wrap_function(Worker, "reload_weights", refuse_when_reordered)
    wrap_function(Worker, "_start_weight_update", refuse_when_reordered)
