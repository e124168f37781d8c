"""`Trainer`: one training run. It reads top to bottom: set-up, the epoch loop, one epoch, evaluation,
checkpoints. The command line is `fastpipe.train.cli` (`python -m fastpipe.train`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from contextlib import closing
from pathlib import Path

import torch
import torch.nn.functional as F

from fastpipe.config import Config, ConfigError, to_toml
from fastpipe.model import model_summary, set_train_mode, stem_of
from fastpipe.train import distributed as dist_utils
from fastpipe.train.assemble import build_training, loader_for, resolve_stem, schedule_training
from fastpipe.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_state,
)
from fastpipe.train.data_wait import DataWait
from fastpipe.train.optim import continue_schedule, plan_epochs, rescale_lr
from fastpipe.train.runtime import Runtime, StopRequest, TrainingError, build_runtime


class Trainer:
    """One training run: the loop over epochs and steps, evaluation, checkpoints and the report.
    Its pieces (loaders, model, optimizer, schedule, step) come from `fastpipe.train.assemble`."""

    def __init__(self, config: Config, run_dir: str | os.PathLike, *, resume: bool = False,
                 init_from: str | os.PathLike | None = None):
        from fastpipe.report.run import RunReport

        self.config, self.run_dir = config, Path(run_dir)
        self.runtime: Runtime = build_runtime(config, distributed=True)
        self.device, self.precision, self.dist = self.runtime.device, self.runtime.precision, self.runtime.dist
        self.main = self.dist.is_main
        state = load_checkpoint(self.run_dir / "last.pt") if resume else None
        self._build_loaders()   # first: missing data fails before a run directory is created
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(self.run_dir)))
            (self.run_dir / "config.toml").write_text(to_toml(resolved))
        self.report = RunReport(self.run_dir, self.classes, enabled=self.main, resume=resume)
        # a resumed run keeps the stem its weights have, whatever "auto" would pick now
        self.stem, self.stem_reason = ((stem_of(state), "the resumed checkpoint's")
                                       if state is not None else resolve_stem(config))
        training = build_training(config, len(self.classes), self.runtime, init_from=None if resume else init_from,
                                  stem=self.stem, log=self.report.log)
        self.training = training
        self.model, self.train_model, self.ema = training.model, training.train_model, training.ema
        self.optimizer, self.compile_counter = training.optimizer, training.compile_counter
        if self.main:
            text, self.flops = model_summary(self.model, self.plans[0].resolution, device=self.device)
            (self.run_dir / "model_summary.txt").write_text(f"{config.model.arch} (width {config.model.width}, "
                                                            f"{self.stem} stem), {len(self.classes)} classes\n\n"
                                                            f"{text}\n")
        self.stop = StopRequest()
        self.start_epoch, self.skip_steps = 0, 0
        self.wall_before, self.started = 0.0, time.perf_counter()
        self.best_top1, self.epochs_since_best = -1.0, 0
        self.last_eval = None
        self.eval_weights, self.eval_scores = "raw", {}   # which weights scored better at the last evaluation
        if state is not None:
            self.peak_lr = float(state["peak_lr"])
        else:
            self.peak_lr = self.find_lr() if config.optim.lr == "auto" else float(config.optim.lr)
        self.total_steps = sum(p.steps for p in self.plans)
        schedule_training(training, config, self.runtime, len(self.classes), self.peak_lr, self.total_steps)
        self.scheduler, self.step = training.scheduler, training.step
        self.scaler = self.precision.scaler
        self.lr_scale = 1.0
        if state is not None:
            self.load_state(state)

    @property
    def global_step(self) -> int:
        return self.step.global_step

    def _build_loaders(self) -> None:
        """Sharded train loader on every rank; evaluation runs on rank 0 over the whole val split."""
        self.train_loader = loader_for(self.config, "train", self.runtime)
        self.val_loader = loader_for(self.config, "val", self.runtime) if self.main else None
        self.classes = list(self.train_loader.classes)
        samples = math.ceil(self.train_loader.num_samples / self.dist.world_size)
        try:
            self.plans = plan_epochs(self.config, samples, self.dist.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    # ---------------------------------------------------------------------------------------------- run
    def fit(self) -> int:
        config, log = self.config, self.report.log
        if self.start_epoch >= config.schedule.epochs:   # nothing left: keep the finished run's summary
            log(f"{self.run_dir} already finished its {config.schedule.epochs} epochs; to train longer: python -m "
                f"fastpipe.train --resume {self.run_dir} --schedule.epochs=N (N > {config.schedule.epochs})")
            self.report.close()
            return 0
        log(f"run {self.run_dir} | {config.model.arch} on {self.device} ({self.precision.name}), "
            f"{self.train_loader.num_samples} train images, {len(self.classes)} classes, "
            f"{config.schedule.epochs} epochs, peak lr {self.peak_lr:.4g}, compile {self.compile_counter is not None}")
        log(f"model: {self.stem} stem ({self.stem_reason}), width {config.model.width}, "
            + (f"EMA of weights (decay {config.model.ema_decay:g}) evaluated beside them" if self.ema is not None
               else "no EMA of weights"))
        for key, value, why in config.size_defaults:
            log(f"small-image default: {key} = {value} ({why}; set {key} to choose another)")
        self.stop.install()
        self.started, status = time.perf_counter(), "finished"
        try:
            for plan in self.plans[self.start_epoch:]:
                metrics = self.train_epoch(plan)
                if metrics is None:
                    return self.interrupted(plan)
                last = plan.epoch == config.schedule.epochs - 1
                if self.main and (last or (plan.epoch + 1) % config.eval.every == 0):
                    self.last_eval = self.evaluate()
                    metrics.update(self.last_eval.metrics())
                    metrics.update(self.eval_scores)
                improved = metrics.get("val_top1", -1.0) > self.best_top1
                if improved:
                    self.best_top1, self.epochs_since_best = metrics["val_top1"], 0
                elif "val_top1" in metrics:
                    self.epochs_since_best += 1
                self.report.epoch(metrics)
                self.save("last.pt", epoch=plan.epoch, completed=True)
                if improved:
                    self.save("best.pt", epoch=plan.epoch, completed=True)
                patience = config.train.early_stop_patience
                if dist_utils.broadcast_flag(bool(patience) and self.epochs_since_best >= patience, self.device):
                    log(f"early stop: val top-1 has not improved for {patience} evaluations")
                    status = "early_stopped"
                    break
            self.finish(status)
            return 0
        finally:
            self.stop.uninstall()

    def train_epoch(self, plan) -> dict | None:
        """One epoch; returns its metrics, or None when a stop was requested mid-epoch.

        Nothing is read from the device between log points: the step keeps its counters there and
        `read_totals` fetches them every train.log_every steps and at the epoch's end.
        """
        loader, config, step_fn = self.train_loader, self.config, self.step
        loader.set_resolution(plan.resolution)
        loader.set_batch_size(plan.batch_size)
        loader.set_epoch(plan.epoch)
        rescale_lr(self.optimizer, plan.lr_scale / self.lr_scale)
        self.lr_scale = plan.lr_scale
        set_train_mode(self.model, config.model.freeze)
        step_fn.reset()
        skip, self.skip_steps = self.skip_steps, 0
        batches = iter(loader)
        for _ in range(skip):   # resuming mid-epoch: the loader's order is a function of (seed, epoch)
            next(batches)
        wait = DataWait(self.device)
        self.interval = (step_fn.global_step, 0.0, 0.0, [])   # global step, loss sum, samples, LRs since
        progress, totals = self._progress(), None
        epoch_start = time.perf_counter()
        with progress, closing(batches):   # the loader's epoch ends here even when the loop raises
            task = progress.add_task(f"epoch {plan.epoch + 1}/{config.schedule.epochs}", total=plan.steps,
                                     completed=skip, info="")
            for step in range(skip, plan.steps):
                wait.waiting()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    raise TrainingError(f"The loader ended after {step} of {plan.steps} batches in epoch "
                                        f"{plan.epoch}; the data changed under the run?") from None
                except Exception:
                    # Ctrl-C also reaches loader worker processes, which then exit. Under DDP the other
                    # ranks may still hold batches and would wait in the next collective: fail instead.
                    if not self.stop or self.dist.enabled:
                        raise
                    self.read_totals(plan, step - 1)   # a non-finite step since the last read stops here
                    self.save("last.pt", epoch=plan.epoch, completed=False, step=step)
                    return None
                wait.ready()
                self.interval[3].append(self.current_lr())
                step_fn(images, labels)
                wait.step_done()
                progress.update(task, advance=1)
                at_log = step_fn.global_step % config.train.log_every == 0 or step == plan.steps - 1
                if at_log:
                    totals = self.read_totals(plan, step)
                    progress.update(task, info=self._progress_info(plan, step, skip, epoch_start, totals))
                # one process: the signal flag is host state, checked every step; under DDP every rank
                # must stop at the same step, so the flag is agreed on at log points only
                stop = bool(self.stop) if not self.dist.enabled else at_log and dist_utils.any_flags(
                    [bool(self.stop)], self.device)[0]
                if stop:
                    if not at_log:   # a non-finite step since the last read must not reach last.pt
                        self.read_totals(plan, step)
                    self.save("last.pt", epoch=plan.epoch, completed=False, step=step + 1)
                    return None
        elapsed = time.perf_counter() - epoch_start
        totals = totals or self.step.read()   # resumed exactly at the epoch's end: nothing was stepped
        compiled = {} if self.compile_counter is None else {"graphs_compiled": self.compile_counter.graphs}
        return {**compiled, "epoch": plan.epoch + 1, "train_loss": totals.loss_sum / max(totals.samples, 1),
                "train_top1": totals.correct / max(totals.samples, 1), "lr": self.current_lr(),
                "momentum": self.current_momentum(), "resolution": plan.resolution,
                "batch_size": plan.batch_size,
                "images_per_second": (plan.steps - skip) * plan.batch_size * self.dist.world_size / elapsed,
                "epoch_time_s": elapsed, "data_wait_pct": 100.0 * wait.collect() / elapsed}

    def read_totals(self, plan, step: int):
        """The log point: one read of the step's counters; logs the interval's mean loss and stops the
        run when a loss was non-finite (the weights are still those from before that step)."""
        totals = self.step.read()
        first_step, loss_sum, samples, lrs = self.interval
        if totals.nonfinite:
            self.nonfinite_stop(plan, step, totals, lrs[totals.first_nonfinite - first_step])
        loss = (totals.loss_sum - loss_sum) / max(totals.samples - samples, 1)
        self.interval = (self.step.global_step, totals.loss_sum, totals.samples, [])
        self.report.step(self.global_step, epoch=plan.epoch + (step + 1) / plan.steps, loss=loss,
                         lr=self.current_lr(), momentum=self.current_momentum())
        if not self.report.console.is_terminal:   # no live progress bar: leave a trace in the log instead
            self.report.log(f"epoch {plan.epoch + 1} step {step + 1}/{plan.steps} loss {loss:.4f} "
                            f"lr {self.current_lr():.4g}")
        return totals

    def nonfinite_stop(self, plan, step: int, totals, lr: float):
        """Save last.pt (its weights predate the first bad step: later updates were skipped on the device)
        and stop with what to change."""
        first = totals.first_nonfinite
        self.step.restore_healthy_state()
        self.save("last.pt", epoch=plan.epoch, completed=False, step=step + 1, nonfinite_from_step=first)
        raise TrainingError(
            f"The loss became non-finite at step {first + 1} (epoch {plan.epoch + 1}, lr {lr:.4g}); "
            f"{totals.nonfinite} step(s) up to step {self.global_step} were skipped and the run stopped. "
            f"The learning rate is probably too high: start again with a lower --optim.lr (now "
            f"{self.peak_lr:.4g} peak; a resumed run keeps its own), or with `--init-from {self.run_dir / 'last.pt'}` "
            f"to keep what it learned, or run the LR finder: `python -m fastpipe.lr_find --config ...`. last.pt "
            f"holds the weights from before step {first + 1} (BatchNorm statistics from the log point before it).")

    def evaluate(self):
        """The raw weights' evaluation, or with model.ema_decay > 0 the better of the raw and the averaged
        weights' (by top-1; `eval_weights` says which, `eval_scores` holds both top-1s for metrics.csv)."""
        from fastpipe.evaluate import evaluate

        def run(model):
            return evaluate(model, self.val_loader, criterion=F.cross_entropy, autocast=self.precision.autocast,
                            flip_tta=self.config.eval.flip_tta, classes=self.classes)

        raw = run(self.model)
        if self.ema is None:
            return raw
        averaged = run(self.ema.module)
        self.eval_weights = "ema" if averaged.top1 > raw.top1 else "raw"
        self.eval_scores = {"raw_val_top1": raw.top1, "ema_val_top1": averaged.top1,
                            "ema_chosen": float(self.eval_weights == "ema")}
        return averaged if self.eval_weights == "ema" else raw

    def find_lr(self) -> float:
        """optim.lr = "auto": an LR range test at the first epoch's resolution; its suggestion is the peak."""
        from fastpipe.train.lr_finder import sweep

        result = sweep(self.config, self.runtime, self.training, self.train_loader, self.plans[0],
                       self.run_dir if self.main else None)
        suggestion = result.suggestion
        if self.dist.enabled:   # every rank must use rank 0's value
            holder = [suggestion]
            torch.distributed.broadcast_object_list(holder, src=0)
            suggestion = holder[0]
        if suggestion is None:
            raise TrainingError(f"The LR finder could not suggest a learning rate ({result.reason}); set "
                                f"optim.lr to a number.")
        others = ", ".join(f"{name} {value or float('nan'):.3g}" for name, value in result.suggestions().items()
                           if name != result.rule)
        self.report.log(f"LR finder: {result.reason}; suggestion {suggestion:.3g} ({result.rule}; {others}); "
                        f"see {self.run_dir / 'lr_finder.png'}")
        self.train_loader.set_epoch(0)
        # the sweep ran at the first stage's batch; peak_lr is defined for data.batch_size on one process
        return float(suggestion) / self.plans[0].lr_scale

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, name: str, *, epoch: int, completed: bool, step: int = 0, **extra) -> None:
        if not self.main:
            return
        save_checkpoint(self.run_dir / name, training_state(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, epoch=epoch,
            completed=completed, step=step, global_step=self.global_step, config=self.config.to_dict(),
            classes=self.classes, stem=self.stem, peak_lr=self.peak_lr, lr_scale=self.lr_scale, best_top1=self.best_top1,
            epochs_since_best=self.epochs_since_best, wall_time_s=self.wall_time(), eval_weights=self.eval_weights,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}), **extra))

    def load_state(self, state: dict) -> None:
        """Continue a run: weights, optimizer, schedule position, scaler, RNG streams and counters."""
        if state.get("classes") != self.classes:
            raise CheckpointError(f"{self.run_dir / 'last.pt'} was trained on other classes than {self.config.data.path}.")
        planned = int(state["scheduler"]["total_steps"])
        restore_training(state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                         scaler=self.scaler, schedule=planned == self.total_steps)
        if self.ema is not None:   # a run that had no average starts one from its current weights
            self.ema.load_state_dict(state.get("ema") or self.model.state_dict())
            self.ema.updates = int(state["global_step"]) if "ema" in state else 0   # the decay's warm-up goes on
        self.eval_weights = state.get("eval_weights", "raw")
        self.step.global_step, self.lr_scale = int(state["global_step"]), float(state["lr_scale"])
        self.best_top1, self.epochs_since_best = float(state["best_top1"]), int(state["epochs_since_best"])
        self.wall_before = float(state.get("wall_time_s", 0.0))
        self.start_epoch = state["epoch"] + 1 if state["completed"] else state["epoch"]
        self.skip_steps = 0 if state["completed"] else int(state["step"])
        if self.start_epoch >= self.config.schedule.epochs:
            return   # fit() says so and leaves the run as it is
        if planned != self.total_steps:
            # the run's length in steps changed (schedule.epochs, or the batch size or process count): the
            # one-cycle curve is the one a run planned for the new length from the start would follow,
            # continued at this step (a finished run's LR rises to that curve again)
            if self.global_step >= self.total_steps:
                raise TrainingError(f"{self.run_dir} has taken {self.global_step} steps, but the run as configured "
                                    f"now has only {self.total_steps}: raise --schedule.epochs to train longer.")
            continue_schedule(self.scheduler, self.global_step)
            self.report.log(f"the run is now {self.total_steps} steps long (was {planned}: schedule.epochs, "
                            f"data.batch_size or the process count changed): the one-cycle schedule is rebuilt "
                            f"for that length and continues at step {self.global_step}, lr {self.current_lr():.4g}")
        where = f"epoch {self.start_epoch + 1}" + (f", step {self.skip_steps}" if self.skip_steps else "")
        self.report.log(f"resuming {self.run_dir} at {where}")

    def interrupted(self, plan) -> int:
        name = signal.Signals(self.stop.signum).name if self.stop else "a signal"
        state = f"epoch {plan.epoch + 1}, step {self.global_step - sum(p.steps for p in self.plans[:plan.epoch])}"
        self.report.log(f"{name} received: saved {self.run_dir / 'last.pt'} at {state}. "
                        f"Resume with: python -m fastpipe.train --resume {self.run_dir}")
        self.report.close()
        return 0

    def wall_time(self) -> float:
        """Seconds of fit() over every session of this run (resumes add up)."""
        return self.wall_before + time.perf_counter() - self.started

    def finish(self, status: str) -> None:
        if not self.main:
            return
        summary = {"status": status, "wall_time_s": self.wall_time(), "peak_lr": self.peak_lr, "arch": self.config.model.arch,
                   "stem": self.stem, "width": self.config.model.width,
                   "backend": self.config.data.backend, "precision": self.precision.name,
                   "world_size": self.dist.world_size, "forward_gflops_per_image": self.flops / 1e9,
                   "graphs_compiled": getattr(self.compile_counter, "graphs", None)}
        sample_ids = None
        if self.last_eval is not None:
            from fastpipe.evaluate import manifest_sample_ids

            sample_ids = manifest_sample_ids(getattr(self.val_loader, "manifest", {}), "val", self.last_eval.targets)
        self.report.finish(summary, self.last_eval, sample_ids=sample_ids)
        self.report.log(f"done: best val top-1 {self.best_top1:.2%}; outputs in {self.run_dir}")

    # -------------------------------------------------------------------------------------- display
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def current_momentum(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["betas"][0] if "betas" in group else group.get("momentum", 0.0))

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = self.report.console
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                        disable=not (self.main and console.is_terminal), transient=True)

    def _progress_info(self, plan, step, skip, epoch_start, totals) -> str:
        done = step + 1 - skip
        rate = done * plan.batch_size * self.dist.world_size / max(time.perf_counter() - epoch_start, 1e-9)
        loss = totals.loss_sum / max(totals.samples, 1)
        info = f"{rate:,.0f} img/s  loss {loss:.3f}  lr {self.current_lr():.3g}"
        if self.device.type == "cuda":
            info += f"  mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        return info
