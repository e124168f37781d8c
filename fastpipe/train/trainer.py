"""`Trainer`: one training run. `fit()` is the loop, read top to bottom: epochs, batches, the step, log
points, evaluation, saving and stopping. `__init__` sets the run up; what the loop calls lives in small
units: `assemble` (the pieces), `resume` (checkpoint state), `run_folder`, `progress`, `fastpipe.report.run`.
The command line is `fastpipe.train.cli` (`python -m fastpipe.train`).
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed

from fastpipe.config import Config, ConfigError
from fastpipe.evaluate import evaluate, manifest_sample_ids
from fastpipe.model import compile_cache_counts, set_train_mode, stem_of
from fastpipe.report.run import RunReport
from fastpipe.train import distributed as dist_utils
from fastpipe.train.assemble import auto_workers, build_training, loader_for, resolve_stem, schedule_training
from fastpipe.train.checkpoint import CheckpointWriter, load_checkpoint
from fastpipe.train.data_wait import DataWait
from fastpipe.train.lr_finder import sweep
from fastpipe.train.optim import plan_epochs, rescale_lr
from fastpipe.train.progress import EpochProgress
from fastpipe.train.resume import RunState, resume_run, save_run
from fastpipe.train.run_folder import write_config, write_model_summary
from fastpipe.train.runtime import StopRequest, TrainingError, build_runtime


@dataclass
class LogInterval:
    """The steps since the last log point: where they started and the LR each one used."""
    first_step: int
    loss_sum: float   # the step counters' loss sum and samples at the interval's start
    samples: float
    lrs: list[float] = field(default_factory=list)


class Trainer:
    """One training run: set-up here, the loop in `fit()`."""

    def __init__(self, config: Config, run_dir: str | os.PathLike, *, resume: bool = False,
                 init_from: str | os.PathLike | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        self.runtime = build_runtime(config, distributed=True)
        self.device, self.precision, self.dist = self.runtime.device, self.runtime.precision, self.runtime.dist
        self.main = self.dist.is_main
        state = load_checkpoint(self.run_dir / "last.pt") if resume else None
        # loaders first, so missing data fails before a run directory is created; every rank evaluates its shard
        self.train_loader = loader_for(config, "train", self.runtime)
        self.val_loader = loader_for(config, "val", self.runtime)
        self.classes = list(self.train_loader.classes)
        try:
            self.plans = plan_epochs(config, math.ceil(self.train_loader.num_samples / self.dist.world_size),
                                     self.dist.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.main:
            write_config(self.run_dir, config)
        self.report = RunReport(self.run_dir, self.classes, enabled=self.main, resume=resume)
        # a resumed run keeps the stem its weights have, whatever "auto" would pick now
        self.stem, self.stem_reason = ((stem_of(state), "the resumed checkpoint's")
                                       if state is not None else resolve_stem(config))
        self.training = build_training(config, len(self.classes), self.runtime, init_from=None if resume else init_from,
                                       stem=self.stem, log=self.report.log)
        self.model, self.ema, self.optimizer = self.training.model, self.training.ema, self.training.optimizer
        self.compile_counter = self.training.compile_counter
        if self.main:
            self.flops = write_model_summary(self.run_dir, config, self.model, stem=self.stem, classes=len(self.classes),
                                             resolution=self.plans[0].resolution, device=self.device)
        self.stop, self.started, self.writer = StopRequest(), time.perf_counter(), CheckpointWriter()
        self.last_eval, self.eval_scores, self.outside_step = None, {}, {}
        if state is not None:
            peak_lr = float(state["peak_lr"])
        else:
            peak_lr = self.find_lr() if config.optim.lr == "auto" else float(config.optim.lr)
        self.total_steps = sum(plan.steps for plan in self.plans)
        schedule_training(self.training, config, self.runtime, len(self.classes), peak_lr, self.total_steps)
        self.scheduler, self.train_step, self.scaler = self.training.scheduler, self.training.step, self.precision.scaler
        self.run = (resume_run(state, self.training, self.scaler, classes=self.classes, total_steps=self.total_steps,
                               epochs=config.schedule.epochs, run_dir=self.run_dir, data=config.data.path,
                               log=self.report.log)
                    if state is not None else RunState(peak_lr=peak_lr))

    @property
    def global_step(self) -> int:
        return self.train_step.global_step

    @property
    def peak_lr(self) -> float:
        return self.run.peak_lr

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> int:
        config = self.config
        if self.run.start_epoch >= config.schedule.epochs:   # nothing left: keep the finished run's summary
            self.report.log(f"{self.run_dir} already finished its {config.schedule.epochs} epochs; to train longer: "
                            f"python -m fastpipe.train --resume {self.run_dir} --schedule.epochs=N "
                            f"(N > {config.schedule.epochs})")
            self.report.close()
            return 0
        self.log_header()
        self.stop.install()
        self.started, status = time.perf_counter(), "finished"
        try:
            for plan in self.plans[self.run.start_epoch:]:
                skip, self.run.skip_batches = self.run.skip_batches, 0
                epoch_began = time.perf_counter()
                batches = self.begin_epoch(plan, skip)
                wait, totals, started = DataWait(self.device), None, time.perf_counter()
                compile_s, compiled_steps = 0.0, 0
                self.interval = LogInterval(self.global_step, 0.0, 0.0)
                with self.progress(plan, skip) as progress, closing(batches):   # the loader's epoch ends here
                    for index in range(skip, plan.steps):
                        wait.waiting()
                        batch = self.next_batch(batches, plan, index)
                        wait.ready()
                        if index == skip:   # a loader's epoch starts at its first batch (iter() is lazy)
                            self.note(plan, "epoch_start", time.perf_counter() - epoch_began)
                        if batch is not None:
                            self.interval.lrs.append(self.current_lr())
                            compiling = self.step(batch)
                            compile_s, compiled_steps = compile_s + compiling, compiled_steps + (compiling > 0)
                            wait.step_done()
                            progress.advance()
                        at_log = batch is not None and (self.global_step % config.train.log_every == 0
                                                        or index == plan.steps - 1)
                        if at_log:   # the only read of the device's counters between epochs
                            totals = self.log_point(plan, index)
                            progress.show(index + 1, totals.loss_sum / max(totals.samples, 1), self.current_lr())
                        if batch is None or self.stop_agreed(at_log):
                            done = index + (batch is not None)   # batches of this epoch trained
                            if not at_log:   # a non-finite step since the last read must not reach last.pt
                                self.log_point(plan, done - 1)
                            self.save("last.pt", epoch=plan.epoch, completed=False, batches_done=done)
                            return self.interrupted(plan)
                if compiled_steps:
                    self.log_compile(plan, compiled_steps, compile_s)
                metrics = self.epoch_metrics(plan, skip, totals, time.perf_counter() - started, wait,
                                             compile_s=compile_s, compiled_steps=compiled_steps)
                final = plan.epoch == config.schedule.epochs - 1
                if final or (plan.epoch + 1) % config.eval.every == 0:
                    with self.timed(plan, "eval"):
                        metrics.update(self.evaluate_epoch(final))
                improved = self.record(metrics)
                with self.timed(plan, "report"):   # metrics.csv, log.md, TensorBoard
                    self.report.epoch(metrics, plots=False)
                with self.timed(plan, "plots"):   # handed to the drawing process
                    self.report.plot_later()
                with self.timed(plan, "checkpoint"):   # a host copy; written while the next epoch runs
                    self.save("last.pt", epoch=plan.epoch, completed=True, background=True,
                              copies=[self.run_dir / "best.pt"] if improved else [])   # best.pt: the same bytes
                if self.early_stop():
                    status = "early_stopped"
                    break
            self.finish(status)
            return 0
        finally:
            self.stop.uninstall()
            self.writer.wait()   # the last checkpoint is on disk when fit() returns

    # ------------------------------------------------------------------------------ what the loop calls
    @contextmanager
    def timed(self, plan, kind: str):
        """Seconds of this epoch spent outside the step loop, by kind, for summary.json."""
        started = time.perf_counter()
        yield
        self.note(plan, kind, time.perf_counter() - started)

    def note(self, plan, kind: str, seconds: float) -> None:
        self.outside_step.setdefault(plan.epoch + 1, {})[kind] = round(seconds, 4)

    def graphs_compiled(self) -> int:
        return 0 if self.compile_counter is None else self.compile_counter.graphs

    def step(self, batch) -> float:
        """One training step; returns its seconds when it compiled a graph (a new shape: the step was mostly
        compiling, and is timed apart from img/s), else 0."""
        graphs, started = self.graphs_compiled(), time.perf_counter()
        self.train_step(*batch)
        return time.perf_counter() - started if self.graphs_compiled() != graphs else 0.0

    def log_compile(self, plan, steps: int, seconds: float) -> None:
        self.note(plan, "compile", seconds)
        cache = compile_cache_counts()
        self.report.log(f"compile: {steps} step(s) of epoch {plan.epoch + 1} compiled graphs, {seconds:.1f} s, "
                        f"left out of its img/s (graph cache so far: {cache['hits']} hit(s), "
                        f"{cache['misses']} miss(es))")

    def log_header(self) -> None:
        config, log = self.config, self.report.log
        log(f"run {self.run_dir} | {config.model.arch} on {self.device} ({self.precision.name}), "
            f"{self.train_loader.num_samples} train images, {len(self.classes)} classes, "
            f"{config.schedule.epochs} epochs, peak lr {self.peak_lr:.4g}, compile {self.compile_counter is not None}")
        log(f"model: {self.stem} stem ({self.stem_reason}), width {config.model.width}, "
            + (f"EMA of weights (decay {config.model.ema_decay:g}) evaluated beside them" if self.ema is not None
               else "no EMA of weights"))
        if self.compile_counter is not None:
            log(f"compile cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR')} (model.compile_cache; later runs with the "
                f"same shapes load their graphs from it); steps that compile are timed apart from img/s")
        if config.data.workers == "auto":
            workers, why = auto_workers()
            log(f"data.workers auto: {workers} per rank ({why})")
        for key, value, why in config.size_defaults:
            log(f"small-image default: {key} = {value} ({why}; set {key} to choose another)")

    def begin_epoch(self, plan, skip: int):
        """The loader, LR scale and model mode set for `plan`; returns its batches, `skip` of them consumed."""
        loader = self.train_loader
        loader.set_resolution(plan.resolution)
        loader.set_batch_size(plan.batch_size)
        loader.set_epoch(plan.epoch)
        rescale_lr(self.optimizer, plan.lr_scale / self.run.lr_scale)
        self.run.lr_scale = plan.lr_scale
        set_train_mode(self.model, self.config.model.freeze)
        self.train_step.reset()
        batches = iter(loader)
        for _ in range(skip):   # resuming mid-epoch: the loader's order is a function of (seed, epoch)
            next(batches)
        return batches

    def progress(self, plan, skip: int) -> EpochProgress:
        return EpochProgress(self.report.console, enabled=self.main, title=f"epoch {plan.epoch + 1}/"
                             f"{self.config.schedule.epochs}", steps=plan.steps, done=skip,
                             images_per_step=plan.batch_size * self.dist.world_size, device=self.device)

    def next_batch(self, batches, plan, index: int):
        """The next batch; None when the loader stopped because a stop signal reached its workers too."""
        try:
            return next(batches)
        except StopIteration:
            raise TrainingError(f"The loader ended after {index} of {plan.steps} batches in epoch {plan.epoch}; "
                                f"the data changed under the run?") from None
        except Exception:
            # Ctrl-C also reaches loader worker processes, which then exit. Under DDP the other ranks may
            # still hold batches and would wait in the next collective: fail instead.
            if not self.stop or self.dist.enabled:
                raise
            return None

    def stop_agreed(self, at_log: bool) -> bool:
        # one process: the signal flag is host state, checked every step; under DDP every rank must stop at
        # the same step, so the flag is agreed on at log points only
        if not self.dist.enabled:
            return bool(self.stop)
        return at_log and dist_utils.any_flags([bool(self.stop)], self.device)[0]

    def log_point(self, plan, index: int):
        """One read of the step's counters: logs the interval's mean loss, and stops the run when a loss was
        non-finite (the weights are still those from before that step)."""
        totals, interval = self.train_step.read(), self.interval
        if totals.nonfinite:
            self.nonfinite_stop(plan, index, totals, interval.lrs[totals.first_nonfinite - interval.first_step])
        loss = (totals.loss_sum - interval.loss_sum) / max(totals.samples - interval.samples, 1)
        self.interval = LogInterval(self.global_step, totals.loss_sum, totals.samples)
        self.report.step(self.global_step, epoch=plan.epoch + (index + 1) / plan.steps, loss=loss,
                         lr=self.current_lr(), momentum=self.current_momentum())
        if not self.report.console.is_terminal:   # no live progress bar: leave a trace in the log instead
            self.report.log(f"epoch {plan.epoch + 1} step {index + 1}/{plan.steps} loss {loss:.4f} "
                            f"lr {self.current_lr():.4g}")
        return totals

    def nonfinite_stop(self, plan, index: int, totals, lr: float):
        """Save last.pt (its weights predate the first bad step: later updates were skipped on the device)
        and stop with what to change."""
        first = totals.first_nonfinite
        self.train_step.restore_healthy_state()
        self.save("last.pt", epoch=plan.epoch, completed=False, batches_done=index + 1, nonfinite_from_step=first)
        raise TrainingError(
            f"The loss became non-finite at step {first + 1} (epoch {plan.epoch + 1}, lr {lr:.4g}); "
            f"{totals.nonfinite} step(s) up to step {self.global_step} were skipped and the run stopped. "
            f"The learning rate is probably too high: start again with a lower --optim.lr (now "
            f"{self.peak_lr:.4g} peak; a resumed run keeps its own), or with `--init-from {self.run_dir / 'last.pt'}` "
            f"to keep what it learned, or run the LR finder: `python -m fastpipe.lr_find --config ...`. last.pt "
            f"holds the weights from before step {first + 1} (BatchNorm statistics from the log point before it).")

    def epoch_metrics(self, plan, skip: int, totals, elapsed: float, wait: DataWait, *, compile_s: float = 0.0,
                      compiled_steps: int = 0) -> dict:
        """The epoch's row of metrics.csv. img/s and data wait leave out the steps that compiled a graph
        (their time is compile_s, reported in summary.json's outside_step_s) unless no other step ran."""
        totals = totals or self.train_step.read()   # resumed exactly at the epoch's end: nothing was stepped
        compiled = {} if self.compile_counter is None else {"graphs_compiled": self.compile_counter.graphs}
        steps, timed = plan.steps - skip, elapsed
        if steps > compiled_steps:
            steps, timed = steps - compiled_steps, elapsed - compile_s
        return {**compiled, "epoch": plan.epoch + 1, "train_loss": totals.loss_sum / max(totals.samples, 1),
                "train_top1": totals.correct / max(totals.samples, 1), "lr": self.current_lr(),
                "momentum": self.current_momentum(), "resolution": plan.resolution, "batch_size": plan.batch_size,
                "images_per_second": steps * plan.batch_size * self.dist.world_size / timed,
                "epoch_time_s": elapsed, "data_wait_pct": 100.0 * wait.collect() / timed}

    def evaluate_epoch(self, final: bool) -> dict:
        """This epoch's val metrics. Flip TTA doubles an evaluation's cost, so by default it runs once, at
        the final evaluation, as a second pass over the chosen weights (val_top1_tta; the report shows it);
        val_top1 itself stays without it, so every epoch's figure, and the choice of best.pt, compare alike."""
        flip, every = self.config.eval.flip_tta, self.config.eval.tta_every
        self.last_eval = self.evaluate(tta=flip and every)
        metrics = {**self.last_eval.metrics(), **self.eval_scores}
        if final and flip and not every:
            weights = self.ema.module if self.run.eval_weights == "ema" else self.model
            self.last_eval = self.evaluate_weights(weights, tta=True)
            metrics.update(val_top1_tta=self.last_eval.top1, val_top5_tta=self.last_eval.top5)
        return metrics

    def evaluate(self, tta: bool = False):
        """The raw weights' evaluation, or with model.ema_decay > 0 the better of the raw and the averaged
        weights' (by top-1; `run.eval_weights` says which, `eval_scores` holds both top-1s for metrics.csv)."""
        raw = self.evaluate_weights(self.model, tta)
        if self.ema is None:
            return raw
        averaged = self.evaluate_weights(self.ema.module, tta)
        self.run.eval_weights = "ema" if averaged.top1 > raw.top1 else "raw"
        self.eval_scores = {"raw_val_top1": raw.top1, "ema_val_top1": averaged.top1,
                            "ema_chosen": float(self.run.eval_weights == "ema")}
        return averaged if self.run.eval_weights == "ema" else raw

    def evaluate_weights(self, module, tta: bool):
        """Every rank evaluates its shard of val with rank 0's BatchNorm statistics (the ones last.pt
        saves; each rank updated its own in its last forward pass); all get the gathered result."""
        dist_utils.broadcast_buffers(module)
        return evaluate(module, self.val_loader, autocast=self.precision.autocast, flip_tta=tta,
                        classes=self.classes)

    def record(self, metrics: dict) -> bool:
        """Best top-1 and evaluations since it; True when this epoch's evaluation is the best so far."""
        improved = metrics.get("val_top1", -1.0) > self.run.best_top1
        if improved:
            self.run.best_top1, self.run.epochs_since_best = metrics["val_top1"], 0
        elif "val_top1" in metrics:
            self.run.epochs_since_best += 1
        return improved

    def early_stop(self) -> bool:
        patience = self.config.train.early_stop_patience
        if dist_utils.broadcast_flag(bool(patience) and self.run.epochs_since_best >= patience, self.device):
            self.report.log(f"early stop: val top-1 has not improved for {patience} evaluations")
            return True
        return False

    def save(self, name: str, *, epoch: int, completed: bool, batches_done: int = 0, **extra) -> None:
        if self.main:
            save_run(self.run_dir / name, self.training, self.scaler, self.run, writer=self.writer, epoch=epoch,
                     completed=completed, batches_done=batches_done, wall_time=self.wall_time(),
                     config=self.config.to_dict(), classes=self.classes, stem=self.stem, **extra)

    def interrupted(self, plan) -> int:
        name = signal.Signals(self.stop.signum).name if self.stop else "a signal"
        state = f"epoch {plan.epoch + 1}, step {self.global_step - sum(p.steps for p in self.plans[:plan.epoch])}"
        self.report.log(f"{name} received: saved {self.run_dir / 'last.pt'} at {state}. "
                        f"Resume with: python -m fastpipe.train --resume {self.run_dir}")
        self.report.close()
        return 0

    def finish(self, status: str) -> None:
        if not self.main:
            return
        self.writer.wait()
        summary = {"status": status, "wall_time_s": self.wall_time(), "peak_lr": self.peak_lr,
                   "arch": self.config.model.arch, "stem": self.stem, "width": self.config.model.width,
                   "backend": self.config.data.backend, "precision": self.precision.name,
                   "world_size": self.dist.world_size, "forward_gflops_per_image": self.flops / 1e9,
                   "graphs_compiled": getattr(self.compile_counter, "graphs", None),
                   "outside_step_s": outside_step_summary(self.outside_step)}
        sample_ids = None
        if self.last_eval is not None:
            sample_ids = manifest_sample_ids(getattr(self.val_loader, "manifest", {}), "val", self.last_eval.targets,
                                             getattr(self.val_loader, "data_dir", ""))
        self.report.finish(summary, self.last_eval, sample_ids=sample_ids)
        self.report.log(f"done: best val top-1 {self.run.best_top1:.2%}; outputs in {self.run_dir}")

    # ------------------------------------------------------------------------------------------ set-up
    def find_lr(self) -> float:
        """optim.lr = "auto": an LR range test at the first epoch's resolution; its suggestion is the peak."""
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

    def wall_time(self) -> float:
        """Seconds of fit() over every session of this run (resumes add up)."""
        return self.run.wall_before + time.perf_counter() - self.started

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def current_momentum(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["betas"][0] if "betas" in group else group.get("momentum", 0.0))


def outside_step_summary(by_epoch: dict[int, dict[str, float]]) -> dict:
    """{"per_epoch": [{epoch, kind: seconds ...}], "total": {kind: seconds}} of this session's epochs."""
    total: dict[str, float] = {}
    for kinds in by_epoch.values():
        for kind, seconds in kinds.items():
            total[kind] = round(total.get(kind, 0.0) + seconds, 4)
    return {"per_epoch": [{"epoch": epoch, **kinds} for epoch, kinds in sorted(by_epoch.items())], "total": total}
