"""`python -m fastpipe.train --config r50.toml [--section.key=value ...]`: train a ResNet on converted data.

`Trainer` reads top to bottom: set-up, the epoch loop, one epoch, evaluation, checkpoints. Run it under
`torchrun --nproc_per_node N -m fastpipe.train ...` for data-parallel training.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from fastpipe import distributed as dist_utils
from fastpipe.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fastpipe.config import Config, ConfigError, load_config, to_toml
from fastpipe.data.beton import BetonError
from fastpipe.model import apply_freeze, build_model, compile_model, load_weights, set_train_mode, summarize
from fastpipe.optim import build_optimizer, build_scheduler, plan_epochs, rescale_lr
from fastpipe.runtime import (  # noqa: F401  (resolve_* and friends are also used via fastpipe.train)
    Precision,
    StopRequest,
    TrainingError,
    configure_backends,
    resolve_device,
    resolve_precision,
    seed_everything,
)

CHECKPOINT_FORMAT = 1


def build_mix(config: Config, num_classes: int):
    """torchvision v2 MixUp and/or CutMix (one picked per batch), or None when both are off."""
    from torchvision.transforms import v2

    choices = [cls(alpha=alpha, num_classes=num_classes) for cls, alpha in
               ((v2.MixUp, config.augment.mixup), (v2.CutMix, config.augment.cutmix)) if alpha > 0]
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def default_run_dir(config: Config) -> Path:
    return Path(config.run.dir or f"runs/{config.run.name}-{datetime.now():%Y%m%d-%H%M%S}")


class Trainer:
    """Everything one training run holds: loaders, model, optimizer, schedule, report, counters."""

    def __init__(self, config: Config, run_dir: str | os.PathLike, *, resume: bool = False,
                 init_from: str | os.PathLike | None = None):
        from fastpipe.report import RunReport

        self.config, self.run_dir = config, Path(run_dir)
        self.device_type = resolve_device(config.train.device)
        self.dist = dist_utils.init(self.device_type)
        self.device = dist_utils.device_for(self.dist, self.device_type)
        self.main = self.dist.is_main
        configure_backends(self.device_type, config.train.deterministic)
        seed_everything(config.train.seed + self.dist.rank, config.train.deterministic)
        self.precision = resolve_precision(config.train.amp, self.device_type)
        state = load_checkpoint(self.run_dir / "last.pt") if resume else None
        self._build_loaders()   # first: missing data fails before a run directory is created
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(self.run_dir)))
            (self.run_dir / "config.toml").write_text(to_toml(resolved))
        self.report = RunReport(self.run_dir, self.classes, enabled=self.main, resume=resume)
        self._build_model(init_from=None if resume else init_from)
        self.optimizer = build_optimizer(self.model, config)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
        self.mix = build_mix(config, len(self.classes))
        self.scaler = self.precision.scaler
        self.stop = StopRequest()
        self.global_step, self.start_epoch, self.skip_steps = 0, 0, 0
        self.best_top1, self.epochs_since_best, self.bad_steps = -1.0, 0, 0
        self.last_eval = None
        if state is not None:
            self.peak_lr = float(state["peak_lr"])
        else:
            self.peak_lr = self.find_lr() if config.optim.lr == "auto" else float(config.optim.lr)
        self.total_steps = sum(p.steps for p in self.plans)
        self.scheduler = build_scheduler(self.optimizer, config, self.peak_lr, self.total_steps)
        self.lr_scale = 1.0
        if state is not None:
            self.load_state(state)

    def _build_loaders(self) -> None:
        """Sharded train loader on every rank; evaluation runs on rank 0 over the whole val split."""
        from fastpipe.data import build_loader

        config, data, aug = self.config, self.config.data, self.config.augment
        if aug.max_scale != 1.0:
            raise ConfigError("augment.max_scale other than 1.0 is not supported by the loaders yet.")
        common = dict(backend=data.backend, data=data.path, workers=data.workers, device=str(self.device),
                      dtype=self.precision.dtype, seed=config.train.seed, **data.options)
        self.schedule = config.schedule_for_resolution()
        self.train_loader = build_loader(split="train", batch_size=self.schedule.batch_size_at(0),
                                         resolution=self.schedule.resolution_at(0), shuffle=True, drop_last=True,
                                         distributed=self.dist.enabled, min_scale=aug.min_scale, ratio=aug.ratio,
                                         flip=aug.flip, **common)
        self.val_loader = build_loader(split="val", batch_size=data.val_batch_size or data.batch_size,
                                       resolution=config.resolution.val, shuffle=False, drop_last=False,
                                       distributed=False, **common) if self.main else None
        self.classes = list(self.train_loader.classes)
        samples = math.ceil(self.train_loader.num_samples / self.dist.world_size)
        try:
            self.plans = plan_epochs(config, samples, self.dist.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _build_model(self, init_from) -> None:
        """`model`: the plain module, used for evaluation and checkpoints; `train_model`: the same
        weights behind DDP and torch.compile, used for training steps."""
        config = self.config
        self.model = build_model(config.model.arch, len(self.classes), blurpool=config.model.blurpool,
                                 zero_init_residual=config.model.zero_init_residual)
        if init_from:
            source = Path(init_from) / "best.pt" if Path(init_from).is_dir() else Path(init_from)
            reset = load_weights(self.model, load_checkpoint(source)["model"])
            self.report.log(f"initialised from {init_from}; freshly initialised: {', '.join(reset) or 'none'}")
        apply_freeze(self.model, config.model.freeze)
        memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=memory_format)
        if self.main:
            text, self.flops = summarize(self.model, self.plans[0].resolution, device=self.device)
            (self.run_dir / "model_summary.txt").write_text(f"{config.model.arch}, {len(self.classes)} classes\n\n"
                                                            f"{text}\n")
        self.train_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device_type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        use_compile = config.model.compile if config.model.compile != "auto" else self.device_type == "cuda"
        self.compile_counter = None
        if use_compile:
            self.train_model, self.compile_counter = compile_model(self.train_model, config.model.compile_backend)

    # ---------------------------------------------------------------------------------------------- run
    def fit(self) -> int:
        config, log = self.config, self.report.log
        log(f"run {self.run_dir} | {config.model.arch} on {self.device} ({self.precision.name}), "
            f"{self.train_loader.num_samples} train images, {len(self.classes)} classes, "
            f"{config.schedule.epochs} epochs, peak lr {self.peak_lr:.4g}, compile {self.compile_counter is not None}")
        self.stop.install()
        started, status = time.perf_counter(), "finished"
        try:
            for plan in self.plans[self.start_epoch:]:
                metrics = self.train_epoch(plan)
                if metrics is None:
                    return self.interrupted(plan)
                last = plan.epoch == config.schedule.epochs - 1
                if self.main and (last or (plan.epoch + 1) % config.eval.every == 0):
                    self.last_eval = self.evaluate()
                    metrics.update(self.last_eval.metrics())
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
            self.finish(status, time.perf_counter() - started)
            return 0
        finally:
            self.stop.uninstall()

    def train_epoch(self, plan) -> dict | None:
        """One epoch; returns its metrics, or None when a stop was requested mid-epoch."""
        loader, config = self.train_loader, self.config
        loader.set_resolution(plan.resolution)
        loader.set_batch_size(plan.batch_size)
        loader.set_epoch(plan.epoch)
        rescale_lr(self.optimizer, plan.lr_scale / self.lr_scale)
        self.lr_scale = plan.lr_scale
        set_train_mode(self.model, config.model.freeze)
        skip, self.skip_steps = self.skip_steps, 0
        loss_sum, correct, seen, wait = 0.0, torch.zeros((), device=self.device), 0, 0.0
        batches = iter(loader)
        for _ in range(skip):   # resuming mid-epoch: the loader's order is a function of (seed, epoch)
            next(batches)
        progress = self._progress(plan, skip)
        epoch_start = time.perf_counter()
        with progress:
            task = progress.add_task(f"epoch {plan.epoch + 1}/{config.schedule.epochs}", total=plan.steps,
                                     completed=skip, info="")
            for step in range(skip, plan.steps):
                if self.device_type == "cuda":
                    torch.cuda.synchronize()   # so the wait below is the loader's, not queued GPU work
                wait_start = time.perf_counter()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    raise TrainingError(f"The loader ended after {step} of {plan.steps} batches in epoch "
                                        f"{plan.epoch}; the data changed under the run?") from None
                except Exception:
                    if not self.stop:   # Ctrl-C also reaches loader worker processes, which then exit
                        raise
                    self.save("last.pt", epoch=plan.epoch, completed=False, step=step)
                    return None
                wait += time.perf_counter() - wait_start
                loss_value, batch_correct, stop = self.train_step(images, labels)
                if math.isfinite(loss_value):
                    loss_sum += loss_value * len(labels)
                    correct += batch_correct
                    seen += len(labels)
                if self.global_step % config.train.log_every == 0 or step == plan.steps - 1:
                    self._log_step(plan, step, loss_value)
                progress.update(task, advance=1, info=self._progress_info(plan, step, loss_value, epoch_start,
                                                                          skip))
                if stop:
                    self.save("last.pt", epoch=plan.epoch, completed=False, step=step + 1)
                    return None
        elapsed = time.perf_counter() - epoch_start
        loss_sum, correct, seen = dist_utils.sum_over_ranks([loss_sum, float(correct), seen], self.device)
        compiled = {} if self.compile_counter is None else {"graphs_compiled": self.compile_counter.graphs}
        return {**compiled, "epoch": plan.epoch + 1, "train_loss": loss_sum / max(seen, 1),
                "train_top1": correct / max(seen, 1), "lr": self.current_lr(),
                "momentum": self.current_momentum(), "resolution": plan.resolution,
                "batch_size": plan.batch_size,
                "images_per_second": (plan.steps - skip) * plan.batch_size * self.dist.world_size / elapsed,
                "epoch_time_s": elapsed, "data_wait_pct": 100.0 * wait / elapsed}

    def train_step(self, images, labels) -> tuple[float, torch.Tensor, bool]:
        """Forward, backward, optimizer and scheduler step; returns (loss, correct count, stop requested).

        A non-finite loss (or a float16 overflow the scaler skips) leaves the weights untouched; too many
        in a row stop the run. With DDP both flags are OR-ed over ranks so every rank takes the same branch.
        """
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        with self.precision.autocast():
            logits = self.train_model(images)
            loss = self.criterion(logits, targets)
        loss_value = loss.detach().float().item()   # the step's one host sync: the NaN/Inf check needs it
        stop, nonfinite = dist_utils.any_flags([bool(self.stop), not math.isfinite(loss_value)], self.device)
        skipped = nonfinite
        if not nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = scale is not None and self.scaler.get_scale() < scale
        self.global_step += 1
        if self.global_step < self.total_steps:   # also on skipped steps: the LR follows the step count
            with warnings.catch_warnings():   # torch warns when a skipped first step precedes this
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        if self.bad_steps >= self.config.train.max_nonfinite_steps:
            raise TrainingError(
                f"{self.bad_steps} steps in a row had a non-finite loss or gradients (last loss {loss_value}, "
                f"lr {self.current_lr():.4g}): the learning rate is probably too high. Lower optim.lr "
                f"(now {self.peak_lr:.4g} peak) or run the LR finder: `python -m fastpipe.lr_find --config ...`.")
        hard = targets.argmax(dim=1) if targets.ndim == 2 else targets
        return loss_value, (logits.detach().argmax(dim=1) == hard).sum(), stop

    def evaluate(self):
        from fastpipe.evaluate import evaluate

        return evaluate(self.model, self.val_loader, criterion=F.cross_entropy, autocast=self.precision.autocast,
                        flip_tta=self.config.eval.flip_tta, classes=self.classes)

    def find_lr(self) -> float:
        """optim.lr = "auto": an LR range test at the first epoch's resolution; its suggestion is the peak."""
        from fastpipe.lr_finder import find_lr

        plan, cfg = self.plans[0], self.config.lr_finder
        self.train_loader.set_resolution(plan.resolution)
        self.train_loader.set_batch_size(plan.batch_size)
        result = find_lr(self.train_model, self.optimizer, self.criterion, self.train_loader,
                         start_lr=cfg.start_lr, end_lr=cfg.end_lr, steps=cfg.steps,
                         autocast=self.precision.autocast,
                         scaler=self.scaler if self.scaler.is_enabled() else None,
                         out_dir=self.run_dir if self.main else None)
        suggestion = result.suggestion
        if self.dist.enabled:   # every rank must use rank 0's value
            holder = [suggestion]
            torch.distributed.broadcast_object_list(holder, src=0)
            suggestion = holder[0]
        if suggestion is None:
            raise TrainingError(f"The LR finder could not suggest a learning rate ({result.reason}); set "
                                f"optim.lr to a number.")
        self.report.log(f"LR finder: {result.reason}; suggestion {suggestion:.3g} (min-loss/10 "
                        f"{result.min_loss_div10 or float('nan'):.3g}, valley {result.valley or float('nan'):.3g}); "
                        f"see {self.run_dir / 'lr_finder.png'}")
        self.train_loader.set_epoch(0)
        # the sweep ran at the first stage's batch; peak_lr is defined for data.batch_size on one process
        return float(suggestion) / self.plans[0].lr_scale

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, name: str, *, epoch: int, completed: bool, step: int = 0) -> None:
        if not self.main:
            return
        save_checkpoint(self.run_dir / name, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "completed": completed, "step": step,
            "global_step": self.global_step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": capture_rng_state(), "config": self.config.to_dict(),
            "classes": self.classes, "peak_lr": self.peak_lr, "lr_scale": self.lr_scale,
            "best_top1": self.best_top1, "epochs_since_best": self.epochs_since_best})

    def load_state(self, state: dict) -> None:
        """Continue a run: weights, optimizer, schedule position, scaler, RNG streams and counters."""
        if state.get("classes") != self.classes:
            raise CheckpointError(f"{self.run_dir / 'last.pt'} was trained on other classes than {self.config.data.path}.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.global_step, self.lr_scale = int(state["global_step"]), float(state["lr_scale"])
        self.best_top1, self.epochs_since_best = float(state["best_top1"]), int(state["epochs_since_best"])
        self.start_epoch = state["epoch"] + 1 if state["completed"] else state["epoch"]
        self.skip_steps = 0 if state["completed"] else int(state["step"])
        epochs = self.config.schedule.epochs
        if self.start_epoch >= epochs:
            self.report.log(f"{self.run_dir} already finished its {epochs} epochs; to train longer, start a new run "
                            f"with --init-from {self.run_dir / 'best.pt'} --schedule.epochs=N")
            return
        where = f"epoch {self.start_epoch + 1}" + (f", step {self.skip_steps}" if self.skip_steps else "")
        self.report.log(f"resuming {self.run_dir} at {where}")

    def interrupted(self, plan) -> int:
        name = signal.Signals(self.stop.signum).name if self.stop else "a signal"
        state = f"epoch {plan.epoch + 1}, step {self.global_step - sum(p.steps for p in self.plans[:plan.epoch])}"
        self.report.log(f"{name} received: saved {self.run_dir / 'last.pt'} at {state}. "
                        f"Resume with: python -m fastpipe.train --resume {self.run_dir}")
        self.report.close()
        return 0

    def finish(self, status: str, seconds: float) -> None:
        if not self.main:
            return
        summary = {"status": status, "wall_time_s": seconds, "peak_lr": self.peak_lr, "arch": self.config.model.arch,
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

    def _progress(self, plan, skip):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = self.report.console
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                        disable=not (self.main and console.is_terminal), transient=True)

    def _progress_info(self, plan, step, loss_value, epoch_start, skip) -> str:
        done = step + 1 - skip
        rate = done * plan.batch_size * self.dist.world_size / max(time.perf_counter() - epoch_start, 1e-9)
        info = f"{rate:,.0f} img/s  loss {loss_value:.3f}  lr {self.current_lr():.3g}"
        if self.device_type == "cuda":
            info += f"  mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        return info

    def _log_step(self, plan, step, loss_value) -> None:
        self.report.step(self.global_step, epoch=plan.epoch + (step + 1) / plan.steps, loss=loss_value,
                         lr=self.current_lr(), momentum=self.current_momentum())
        if not self.report.console.is_terminal:   # no live progress bar: leave a trace in the log instead
            self.report.log(f"epoch {plan.epoch + 1} step {step + 1}/{plan.steps} loss {loss_value:.4f} "
                            f"lr {self.current_lr():.4g}")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m fastpipe.train",
        description="Train a ResNet on converted data. Any config key can be set as --section.key=value.",
        epilog="example: python -m fastpipe.train --config r18.toml --optim.lr=0.4 --data.backend=dali")
    parser.add_argument("--config", help="TOML file, or a name in configs/ (r50.toml, r18.toml, cpu-smoke.toml)")
    parser.add_argument("--tune", help="TOML with the same sections merged over the config (from autotune)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR/last.pt at its next epoch")
    parser.add_argument("--init-from", metavar="CKPT", help="start from these weights (fine-tuning)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config_path = args.config
        if args.resume and not config_path:
            config_path = Path(args.resume) / "config.toml"
            if not config_path.is_file():
                raise ConfigError(f"{args.resume} has no config.toml: is it a run directory?")
        config = load_config(config_path, overrides, tune=args.tune)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    run_dir = Path(args.resume) if args.resume else default_run_dir(config)
    try:
        return Trainer(config, run_dir, resume=bool(args.resume), init_from=args.init_from).fit()
    except (BetonError, CheckpointError, TrainingError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: CUDA out of memory at data.batch_size={config.data.batch_size}, resolution up to "
              f"{max(config.resolution.start, config.resolution.end, config.resolution.val)} px. Use a smaller "
              f"batch (--data.batch_size={max(1, config.data.batch_size // 2)}) or find the largest that fits "
              f"with `python -m benchmarks autotune`.", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
