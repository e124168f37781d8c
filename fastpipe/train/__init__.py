"""Training: the loop (`trainer`), what it is built from (`assemble`: device, precision, loaders, model,
optimizer, step), the step itself, LR and resolution schedules, the LR finder, the weight average,
checkpoints, data-wait accounting and DDP helpers. `python -m fastpipe.train` is `cli.main`.
"""
from __future__ import annotations

import importlib

# Trainer and main are loaded on first use: fastpipe.config imports fastpipe.train.resolution, and the
# trainer imports fastpipe.config, so importing them here would make a cycle.
_LAZY = {"Trainer": "fastpipe.train.trainer", "TrainingError": "fastpipe.train.runtime", "main": "fastpipe.train.cli",
         "default_run_dir": "fastpipe.train.cli"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastpipe.train' has no attribute {name!r}")
