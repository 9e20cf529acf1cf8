"""One rank of a multi-process gate-training run, for test_distributed.py (start it with torchrun).

``python -m torch.distributed.run --nproc-per-node N tests/gate_training/dist_worker.py CONFIG.json``
trains with the Python API and writes ``<out>/rank<R>.json``: this rank's final gates and how its
model was sharded, so the test can check that all ranks agree and FSDP really sharded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from torch.distributed.tensor import DTensor

    from gate_training.config import TrainConfig
    from gate_training.trainer import GateTrainer

    cfg = TrainConfig(**json.loads(Path(sys.argv[1]).read_text()))
    trainer = GateTrainer(cfg, progress=False)
    try:
        layer_weight = next(p for n, p in trainer.model.named_parameters() if "layers.0." in n)
        report = {
            "rank": trainer.dist.rank,
            "world_size": trainer.dist.world_size,
            "batch_size": trainer.batch_size,
            "start_step": trainer.step,
            "gates_sharded": isinstance(trainer._param, DTensor),
            "layer_weight_local": layer_weight.to_local().numel() if isinstance(layer_weight, DTensor) else None,
            "layer_weight_full": layer_weight.numel(),
        }
        result = trainer.train()
        report.update(
            gates=result.gates.tolist(),
            finished=result.finished,
            steps_done=result.steps_done,
            losses=[r["loss"] for r in result.history],
            regs=[r["reg"] for r in result.history],
            pattern_path=str(result.pattern_path),
            evaluation=result.evaluation,
        )
        (cfg.out_path / f"rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
