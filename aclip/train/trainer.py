"""The trainer: the loop and the plumbing around one training method (docs/design.md).

It knows no method. The method (:mod:`aclip.methods`) builds the student, its per-sample views,
anything kept beside the student (an EMA teacher) and the loss of a step; the trainer builds the
DeepSpeed engine around the student and runs the loop: batches from the data stream
(:mod:`aclip.data.stream`), one optimizer step per batch with non-finite steps skipped on every
rank alike (:mod:`aclip.train.numerics`), the method's after-step update, metrics and pictures,
periodic evaluation, stop signals (:mod:`aclip.train.signals`) and checkpoints
(:mod:`aclip.train.checkpoint`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from aclip import distributed as dist_utils
from aclip.config import Config, check_world_size, to_yaml
from aclip.data.stream import TrainStream
from aclip.distributed import DistInfo
from aclip.interop.safe_load import trusting
from aclip.methods import RunContext, build_method, shape_fields
from aclip.model import build_clip
from aclip.model.clip import LOGIT_SCALE_MAX
from aclip.tokenizer import Tokenizer
from aclip.train.accumulation import micro_losses
from aclip.train.checkpoint import Checkpointer, Counters, seed_everything, will_resume
from aclip.train.metrics import TrainMetrics
from aclip.train.numerics import NonFiniteLoss, StepGuard, apply_step
from aclip.train.optim import build_optimizer, build_scheduler, run_length
from aclip.train.preflight import resolve_epoch_size
from aclip.train.signals import StopSignals


def _scalar_name(key: str) -> str:
    """``loss`` -> ``loss/total``, ``loss_clip`` -> ``loss/clip``."""
    return "loss/total" if key == "loss" else f"loss/{key.removeprefix('loss_')}"


class Trainer:
    """Builds the method, its student's engine and the data stream from a :class:`Config`; runs
    the loop, evaluates and checkpoints."""

    def __init__(self, cfg: Config, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.train.output_dir)
        self.per_rank_batch = check_world_size(cfg, dist_info.world_size)
        self.length = run_length(cfg, resolve_epoch_size(cfg))
        if dist_info.is_main:
            print(self.length.describe(), flush=True)
        seed_everything(cfg.train.seed)
        self.tokenizer = Tokenizer(cfg.model.context_length)
        self.method = build_method(cfg, self._context())
        student = self.method.build_student()
        self._init_from_pretrained(student)
        self.model = dist_utils.convert_global_bn(student).to(self.device)
        self.method.attach(self.model)
        self.engine = self._build_engine()
        self.counters = Counters()
        rank_prefix = f"rank {dist_info.rank}: " if dist_info.world_size > 1 else ""
        self.stream = TrainStream(cfg.data, self.tokenizer, self.method.sample_views(),
                                  self.per_rank_batch, cfg.train.seed, rank_prefix)  # fmt: skip
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", dist_info,
                                         cfg.train.keep_checkpoints, shape_fields)  # fmt: skip
        self.signals = StopSignals()
        self.numerics = StepGuard(self.model, cfg.train.max_bad_steps)  # skipped-step bookkeeping
        keys = ("loss", *(f"loss_{term}" for term in self.method.loss_terms))
        self.metrics = TrainMetrics(keys, dist_info.world_size, self.device)
        self.writer = None

    # ----------------------------------------------------------------- set-up
    def _precision(self) -> str:
        """The configured precision; fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16
        training), so the CPU runs fp32 instead; bf16 and amp_bf16 run on the CPU too."""
        precision = self.cfg.train.precision
        return "fp32" if precision == "fp16" and self.device.type != "cuda" else precision

    def _context(self) -> RunContext:
        precision = self._precision()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        autocast = precision == "amp_bf16" or (self.device.type == "cuda" and precision == "bf16")
        return RunContext(self.device, self.dist.rank, self.dist.world_size,
                          self.length.total_steps, dtype, autocast)  # fmt: skip

    def _student_forward(self, *args: Any) -> dict[str, torch.Tensor]:
        """The engine's forward; under bf16 autocast with ``train.precision=amp_bf16`` (fp32
        weights and optimizer, open_clip's amp_bf16; the loss stays outside autocast)."""
        if self._precision() != "amp_bf16":
            return self.engine(*args)
        with self.method.ctx.autocast():
            return self.engine(*args)

    def _init_from_pretrained(self, student: torch.nn.Module) -> None:
        """``model.init_from``: pretrained weights into the student's CLIP (before any teacher
        copies it); refused (WeightsError) naming the keys and shapes that do not fit."""
        model = self.cfg.model
        if not model.init_from or will_resume(self.cfg):
            return  # a resumed run's weights come from its checkpoint
        from aclip.interop import init_from

        with trusting(self.cfg.train.trust_checkpoint):
            notes = init_from(student.clip, model.init_from, model.init_from_name or None)
        if self.dist.is_main:
            print(f"initialised from {model.init_from}: " + "; ".join(notes), flush=True)

    def _build_engine(self) -> Any:
        cfg = self.cfg
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.length.steps_per_epoch,
                                    self.length.total_steps)  # fmt: skip
        ds_cfg = dist_utils.deepspeed_config(cfg.train.global_batch_size, self.per_rank_batch,
                                             self._precision(), cfg.train.zero_stage,
                                             cfg.optim.grad_clip, cfg.train.accum_freq)  # fmt: skip
        return dist_utils.build_engine(self.model, optimizer, scheduler, ds_cfg)

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.counters.step

    @property
    def samples_seen(self) -> int:
        """Training samples consumed, over all ranks (skipped steps included)."""
        return self.counters.samples_seen

    @property
    def total_steps(self) -> int:
        """Length of the LR and EMA schedules."""
        return self.length.total_steps

    @property
    def end_step(self) -> int:
        """The step this run stops at."""
        return self.length.end_step

    @property
    def stop_signal(self) -> int | None:
        """The stop signal received (any rank), if any."""
        return self.signals.received

    # ----------------------------------------------------------------- the step
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's part of the global batch; returns detached losses.

        When the loss or a gradient is NaN/Inf on any rank, every rank skips the step alike
        (nothing changes but the data position; ``self.numerics.last_skipped`` is set) and
        ``train.max_bad_steps`` skips in a row save a checkpoint and raise `NonFiniteLoss`.
        """
        self.numerics.snapshot()
        self.counters.samples_seen += len(batch["tokens"]) * self.dist.world_size
        micro = micro_losses(self.method, self._student_forward, batch, self.step,
                             self.cfg.train.accum_freq)  # fmt: skip
        loss, bad = apply_step(self.engine, self.model, micro)
        if bad:
            self._skip_step(bad)
        else:
            dist_utils.clamp_parameter_(self.model.clip.logit_scale, 0.0, LOGIT_SCALE_MAX)
            self.method.after_step(self.step)
            self.counters.step += 1
            self.numerics.good()
        terms = {f"loss_{name}": value.detach() for name, value in loss.terms.items()}
        return {"loss": loss.total.detach()} | terms

    def _skip_step(self, what: str) -> None:
        """A step skipped for a non-finite ``what``: undo the forward pass's buffer updates,
        count and report it; at ``train.max_bad_steps`` in a row save and raise NonFiniteLoss."""
        self.numerics.restore()
        stop = self.numerics.bad()
        guard, limit = self.numerics, self.cfg.train.max_bad_steps
        if self.dist.is_main:
            print(f"step {self.step}: non-finite {what} on some rank, step skipped "
                  f"({guard.in_a_row} in a row, {guard.skipped} in all; the run stops at "
                  f"train.max_bad_steps={limit} in a row)", flush=True)  # fmt: skip
        if stop:
            path = self.save_checkpoint()
            raise NonFiniteLoss(
                f"{guard.in_a_row} steps in a row had a non-finite (NaN/Inf) {what} "
                f"(train.max_bad_steps={limit}); the last good state, step {self.step}, is "
                f"saved in {path} (train.resume=latest goes on from it; check the data, lower "
                f"optim.lr)"
            )

    # ----------------------------------------------------------------- the loop
    def fit(self, loader: Any | None = None) -> bool:
        """Train until ``end_step``, logging, checkpointing and showing progress on rank 0.

        ``loader`` (optional) gives the first batches; the data stream goes on with its own
        loaders. On SIGUSR1, SIGTERM or SIGINT every rank stops at the same step boundary after
        saving a checkpoint: returns False then (``self.stop_signal`` says which), True when
        training is done.
        """
        from tqdm import tqdm

        self._open_run_dir()
        bar = tqdm(
            total=self.end_step, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (self.dist.is_main and self.cfg.train.progress),
        )  # fmt: skip
        if loader is not None:
            self.stream.use(loader)
        with self.signals:
            while self.step < self.end_step:
                if self._should_stop():
                    bar.close()
                    self._stop_for_signal()
                    return False
                t0 = time.perf_counter()
                batch = self.stream.next(self.samples_seen)
                t1, before = time.perf_counter(), self.step
                losses = self.train_step(batch)
                if self.step == before:  # non-finite, skipped: no step to log or save
                    continue
                self.metrics.add(losses, t1 - t0, time.perf_counter() - t0, len(batch["tokens"]))
                self._after_step(bar, batch)
        bar.close()
        self.save_checkpoint()  # a no-op when this step is saved already
        return True

    def _should_stop(self) -> bool:
        """Whether any rank got a stop signal; asked every ``train.signal_check_every`` steps."""
        if self.step % max(1, self.cfg.train.signal_check_every) != 0:
            return False
        return self.signals.check(self.device)

    def _stop_for_signal(self) -> None:
        """Save the state at this step boundary so that the next start resumes here."""
        path = self.save_checkpoint()
        if self.dist.is_main:
            print(f"preempted at step {self.step} ({self.signals.name}): checkpoint saved in "
                  f"{path}", flush=True)  # fmt: skip

    def _after_step(self, bar: Any, batch: dict) -> None:
        cfg = self.cfg.train
        bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == self.end_step:
            scalars = self._flush_scalars()
            bar.set_postfix(
                skipped=self.stream.skips.skipped(),
                bad_steps=self.numerics.skipped,
                loss=f"{scalars['loss/total']:.3f}",
                sps=f"{scalars['perf/samples_per_s']:.0f}",
            )
            if self.dist.is_main and not cfg.progress:
                print(f"step {self.step}/{self.end_step} loss {scalars['loss/total']:.4f} "
                      f"samples/s {scalars['perf/samples_per_s']:.0f}", flush=True)  # fmt: skip
        if cfg.image_log_every and (self.step % cfg.image_log_every == 0 or self.step == 1):
            self._log_images(batch)
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
            if self.step < self.end_step:
                self.stream.at_checkpoint(self.samples_seen)
            self.save_checkpoint()
        if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0:
            self.periodic_eval()

    # ----------------------------------------------------------------- metrics and eval
    def _flush_scalars(self) -> dict[str, float]:
        """The interval's metrics over all ranks (one all-reduce) to tensorboard; stops the run
        (every rank alike) when too many samples were bad."""
        means, counts_all = self.metrics.flush(self.stream.skips.totals())
        self.stream.check_health(counts_all, self.samples_seen)
        scalars = {_scalar_name(key): value for key, value in means.items()}
        scalars |= {
            "train/lr": self.engine.get_lr()[0],
            "train/logit_scale": float(self.model.clip.logit_scale_exp().item()),
        }
        scalars |= self.method.scalars(self.step)
        scalars["train/skipped_steps"] = float(self.numerics.skipped)
        scalars |= self.metrics.perf_and_data(counts_all)
        if self.writer is not None:
            for key, val in scalars.items():
                self.writer.add_scalar(key, val, self.step)
        return scalars

    def _log_images(self, batch: dict[str, torch.Tensor]) -> None:
        if self.writer is not None:
            for tag, image in self.method.images(batch, self.step).items():
                self.writer.add_image(tag, image, self.step)

    def eval_clip(self) -> torch.nn.Module:
        """The CLIP to evaluate: the student's, or with bf16/fp16 weights an fp32 copy made from
        the optimizer's master weights (gathered: every rank calls this)."""
        clip = self.model.clip
        if self.method.ctx.input_dtype == torch.float32:
            return clip
        params = dist_utils.fp32_parameters(clip)
        with torch.device("meta"):
            copy = build_clip(self.cfg.model, self.cfg.loss)
        copy = copy.to_empty(device=self.device)
        buffers = dict(clip.named_buffers())
        with torch.no_grad():
            for name, param in copy.named_parameters():
                param.copy_(params[name])
            for name, buffer in copy.named_buffers():
                buffer.copy_(buffers[name])
        return copy

    def evaluate(self) -> dict[str, dict[str, float]]:
        """The configured eval sets on the online model, from its fp32 weights, at
        ``eval.precision`` whatever the training's (the eval CLIs' ``--precision`` rule; each
        set's metrics record it); rank 0, other ranks get {}."""
        results: dict[str, dict[str, float]] = {}
        clip = self.eval_clip()
        if self.dist.is_main:
            from aclip.eval.evaluate import evaluate_sets
            from aclip.eval.region import region_on_wds

            ev = self.cfg.eval
            results = evaluate_sets(
                clip, self.tokenizer, ev.zeroshot_sets, ev.retrieval_sets,
                self.cfg.model.image_size, ev.batch_size, self.device,
                extra=[("region", ev.region_sets, region_on_wds)], precision=ev.precision,
            )  # fmt: skip
        dist_utils.barrier()
        return results

    def periodic_eval(self) -> None:
        """:meth:`evaluate` and log ``eval/<kind>/<set>/<metric>`` to tensorboard."""
        for name, metrics in self.evaluate().items():
            for metric, value in metrics.items():
                if self.writer is not None and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{name}/{metric}", value, self.step)

    # ----------------------------------------------------------------- files
    def _open_run_dir(self) -> None:
        """Create the run directory, write the resolved config, open tensorboard (rank 0)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
        dist_utils.barrier()

    def save_checkpoint(self) -> Path:
        """Save this step (see :class:`aclip.train.checkpoint.Checkpointer`); returns its
        directory."""
        return self.checkpointer.save(self.engine, self.counters, self.method, self.stream,
                                      to_yaml(self.cfg))  # fmt: skip

    def resume(self, which: str = "latest") -> bool:
        """Go on from the newest whole checkpoint (``latest``) or a given tag directory; False
        when there is none."""
        with trusting(self.cfg.train.trust_checkpoint):
            counters = self.checkpointer.resume(self.engine, self.method, self.stream, self.cfg,
                                                which)  # fmt: skip
        if counters is None:
            return False
        self.counters = counters
        return True

    def write_results(self, results: dict[str, Any]) -> None:
        """Final metrics as JSON beside the checkpoints (rank 0)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))

    def close(self) -> None:
        """End the data loader's workers and flush the logs."""
        self.stream.close()
        if self.writer is not None:
            self.writer.close()
