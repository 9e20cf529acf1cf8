"""What one training step computes: the gated model's hidden states, the distillation loss, and
the held-out evaluation of a gate set (the loop around them is :mod:`gate_training.trainer`).

Per sample: the frozen model runs once as the teacher (plain causal attention, no grad) and once
as the student (every head mixes full and streaming attention by its gate); the loss is the mean
squared difference of the final hidden states (after the final norm) at the positions that
predict the answer tokens, plus ``reg_weight * mean(|alpha|)``, which pushes gates towards
streaming wherever the model does not need the full context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gate_training.gated_attention import GateState

__all__ = ["Distillation", "GatedModel"]


class GatedModel(torch.nn.Module):
    """The frozen causal LM and its gates as one module: what the trainer calls, and FSDP shards.

    ``forward`` returns the final hidden states (fp32) at positions ``[start, end)`` of a single
    sequence, ``mean(|gates|)`` and, with ``predict``, the LM head's argmax there. It points the
    gated attention at ``self.gates`` for the call: in a multi-process run that is the parameter
    FSDP has all-gathered for this forward (and keeps for the backward, recomputation included),
    so the gates' gradient goes through FSDP's reduce-scatter like any other parameter's.
    ``gates`` overrides them for one (evaluation) call. In one process this is exactly what the
    trainer computed before the wrapper existed.
    """

    def __init__(self, model: torch.nn.Module, state: GateState):
        super().__init__()
        self.model = model
        self.gates = state.gates
        self.sharded = False  # set once FSDP shards this module
        object.__setattr__(self, "_state", state)  # not a submodule

    def forward(self, input_ids: torch.Tensor, start: int, end: int, gates: torch.Tensor | None = None,
                predict: bool = False):
        state = self._state
        state.gates = self.gates if gates is None else gates
        try:
            hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            hidden = hidden[0, start:end].float()
            if self.sharded and hidden._is_view():  # FSDP hooks its outputs: no views (fp32 models)
                hidden = hidden.clone()
            reg = self.gates.abs().mean()
            predicted = None
            if predict:
                head = self.model.get_output_embeddings()
                with torch.no_grad():
                    predicted = head(hidden.to(head.weight.dtype)).argmax(-1)
        finally:
            state.gates = self.gates
        return hidden, reg, predicted


class Distillation:
    """The per-sample terms and the held-out evaluation, over a :class:`GatedModel` on ``device``.

    Held by the trainer; the gated model and its gate state are shared with it (FSDP sharding
    and checkpoint loads act on the same objects).
    """

    def __init__(self, gated: GatedModel, state: GateState, device: torch.device, *, reg_weight: float):
        self.gated, self.state, self.device, self.reg_weight = gated, state, device, reg_weight

    def inputs(self, sample: dict[str, Any]) -> tuple[torch.Tensor, slice]:
        ids = torch.as_tensor(sample["input_ids"], dtype=torch.long, device=self.device).view(1, -1)
        # hidden state at position p predicts token p + 1: supervise the answer's predictors
        return ids, slice(int(sample["answer_start"]) - 1, ids.shape[1] - 1)

    def teacher_hidden(self, sample: dict[str, Any]) -> torch.Tensor:
        """Final hidden states of the unmodified model at the supervised positions (fp32)."""
        ids, sup = self.inputs(sample)
        with torch.no_grad(), self.state.teacher():
            return self.gated(ids, sup.start, sup.stop)[0]

    def losses(self, sample: dict[str, Any], *, grad: bool, teacher: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Distillation and regularisation terms on one sample with the current gates."""
        if teacher is None:
            teacher = self.teacher_hidden(sample)
        ids, sup = self.inputs(sample)
        with torch.set_grad_enabled(grad):
            student, reg, _ = self.gated(ids, sup.start, sup.stop)
            distill = (student - teacher).pow(2).mean()
            total = distill + self.reg_weight * reg
        return {"loss": total, "distill": distill, "reg": reg}

    def evaluate(self, samples: list[dict[str, Any]], gates: torch.Tensor, sparsity: float) -> dict[str, Any]:
        """Distillation loss and answer-token accuracy on held-out samples for several gate sets.

        ``gates`` is the whole gate tensor. ``trained``: the continuous gates; ``deploy``:
        binarised at ``sparsity`` (what the plugin serves: alpha 1 = full attention, 0 =
        streaming); ``inverse``: the same number of retrieval heads picked from the LOWEST gates;
        ``all_streaming``: every head streaming. Accuracy is teacher-forced: the share of answer
        (passkey) tokens that the model's argmax predicts; ``teacher`` is the unmodified model. A
        useful pattern has deploy << inverse in loss and deploy close to teacher in accuracy.
        """
        from gate_training.needle import head_sets

        masks = head_sets(gates.cpu().numpy(), sparsity)
        candidates = {
            "trained": gates,
            "deploy": torch.from_numpy(masks["pattern"].astype(np.float32)),
            "inverse": torch.from_numpy(masks["inverse"].astype(np.float32)),
            "all_streaming": torch.zeros_like(gates),
        }
        distill = {name: [] for name in candidates}
        accuracy = {name: [] for name in ["teacher", *candidates]}
        hidden_mean_square = []  # the scale the distillation term (and so the reg weight) works at

        def token_accuracy(predicted, sample):
            target = torch.as_tensor(sample["input_ids"][int(sample["answer_start"]):], device=predicted.device)
            return float((predicted == target).float().mean())

        for sample in samples:
            ids, sup = self.inputs(sample)
            with torch.no_grad(), self.state.teacher():
                teacher, _, predicted = self.gated(ids, sup.start, sup.stop, predict=True)
            accuracy["teacher"].append(token_accuracy(predicted, sample))
            hidden_mean_square.append(float(teacher.pow(2).mean()))
            for name, candidate in candidates.items():
                with torch.no_grad():
                    student, _, predicted = self.gated(
                        ids, sup.start, sup.stop, gates=candidate.to(self.device), predict=True
                    )
                distill[name].append(float((student - teacher).pow(2).mean()))
                accuracy[name].append(token_accuracy(predicted, sample))
        return {
            "samples": len(samples),
            "context_lengths": [int(s["context_length"]) for s in samples],
            "sparsity": sparsity,
            "distill": {k: round(float(np.mean(v)), 6) for k, v in distill.items()},
            "answer_token_accuracy": {k: round(float(np.mean(v)), 4) for k, v in accuracy.items()},
            "teacher_hidden_mean_square": round(float(np.mean(hidden_mean_square)), 4),
        }
