"""A run's place and record beyond its weights (`RunState`), written into last.pt/best.pt by `save_run` and
read back by `resume_run`, which continues the run exactly: weights, optimizer, schedule position, scaler,
RNG streams, the weight average and the counters."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastpipe.train.checkpoint import CheckpointError, CheckpointWriter, restore_training, training_state
from fastpipe.train.optim import continue_schedule
from fastpipe.train.runtime import TrainingError


@dataclass
class RunState:
    """Where a run stands: what last.pt carries besides weights, optimizer and schedule."""
    peak_lr: float = 0.0
    lr_scale: float = 1.0          # the current epoch's LR scale (its batch size against data.batch_size)
    start_epoch: int = 0           # the epoch fit() starts at
    skip_batches: int = 0          # batches of start_epoch already trained (a run stopped mid-epoch)
    best_top1: float = -1.0
    epochs_since_best: int = 0
    wall_before: float = 0.0       # seconds of fit() in earlier sessions of this run
    eval_weights: str = "raw"      # the weights that scored better at the last evaluation: "raw" or "ema"


def save_run(path: Path, training, scaler, run: RunState, *, writer: CheckpointWriter, epoch: int, completed: bool,
             batches_done: int, wall_time: float, config: dict, classes: list[str], stem: str, copies=(),
             background: bool = False, **extra) -> None:
    """`batches_done`: batches of `epoch` trained when it is not `completed` (the checkpoint's "step");
    `copies` get the same bytes; `background`: see CheckpointWriter."""
    ema = {"ema": training.ema.state_dict()} if training.ema is not None else {}
    writer.save(path, training_state(
        model=training.model, optimizer=training.optimizer, scheduler=training.scheduler, scaler=scaler,
        epoch=epoch, completed=completed, step=batches_done, global_step=training.step.global_step, config=config,
        classes=classes, stem=stem, peak_lr=run.peak_lr, lr_scale=run.lr_scale, best_top1=run.best_top1,
        epochs_since_best=run.epochs_since_best, wall_time_s=wall_time, eval_weights=run.eval_weights,
        **ema, **extra), copies=copies, background=background)


def resume_run(state: dict, training, scaler, *, classes: list[str], total_steps: int, epochs: int, run_dir: Path,
               data: str, log) -> RunState:
    """Load `state` (last.pt) into the built run and return where it stands. A run whose length in steps
    changed keeps its new one-cycle curve, continued at the step it reached."""
    if state.get("classes") != classes:
        raise CheckpointError(f"{run_dir / 'last.pt'} was trained on other classes than {data}.")
    planned = int(state["scheduler"]["total_steps"])
    restore_training(state, model=training.model, optimizer=training.optimizer, scheduler=training.scheduler,
                     scaler=scaler, schedule=planned == total_steps)
    if training.ema is not None:   # a run that had no average starts one from its current weights
        training.ema.load_state_dict(state.get("ema") or training.model.state_dict())
        training.ema.updates = int(state["global_step"]) if "ema" in state else 0   # the decay's warm-up goes on
    global_step = training.step.global_step = int(state["global_step"])
    run = RunState(peak_lr=float(state["peak_lr"]), lr_scale=float(state["lr_scale"]),
                   start_epoch=state["epoch"] + 1 if state["completed"] else state["epoch"],
                   skip_batches=0 if state["completed"] else int(state["step"]), best_top1=float(state["best_top1"]),
                   epochs_since_best=int(state["epochs_since_best"]),
                   wall_before=float(state.get("wall_time_s", 0.0)), eval_weights=state.get("eval_weights", "raw"))
    if run.start_epoch >= epochs:
        return run   # fit() says so and leaves the run as it is
    if planned != total_steps:
        # the run's length in steps changed (schedule.epochs, or the batch size or process count): the
        # one-cycle curve is the one a run planned for the new length from the start would follow,
        # continued at this step (a finished run's LR rises to that curve again)
        if global_step >= total_steps:
            raise TrainingError(f"{run_dir} has taken {global_step} steps, but the run as configured now has "
                                f"only {total_steps}: raise --schedule.epochs to train longer.")
        continue_schedule(training.scheduler, global_step)
        log(f"the run is now {total_steps} steps long (was {planned}: schedule.epochs, data.batch_size or the "
            f"process count changed): the one-cycle schedule is rebuilt for that length and continues at step "
            f"{global_step}, lr {training.optimizer.param_groups[0]['lr']:.4g}")
    where = f"epoch {run.start_epoch + 1}" + (f", step {run.skip_batches}" if run.skip_batches else "")
    log(f"resuming {run_dir} at {where}")
    return run
