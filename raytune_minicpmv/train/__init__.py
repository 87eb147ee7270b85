"""Training stage: Ray Train TorchTrainer workers running a DeepSpeed engine, LoRA or full.

    from raytune_minicpmv.train import run_train, build_trainer
    summary = run_train(cfg)                          # one run: validate, fit, report
    trainer = build_trainer(cfg, run_name="trial-1")  # for Tune trial drivers

Inside: `trainer.py` (driver and worker loop), `engine.py` (DeepSpeed config, optimizer, lr schedule),
`checkpoint.py` (checkpoint layout), `metrics.py` (FLOP model, throughput, trackers). See docs/TRAINING.md.
"""
from .trainer import build_trainer, run_train

__all__ = ["run_train", "build_trainer"]
