"""The A-CLIP trainer: one DeepSpeed engine for the student, an EMA teacher beside it.

Per step (DESIGN.md): the teacher encodes the EMA view with all tokens and returns the CLS
relevance; the relevance is mapped onto each online view's box and the top-k patches kept; both
views and the captions go through the student in one batch; InfoNCE + NT-Xent + BYOL; one
optimizer step; one EMA update.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aclip import checkpoint as ckpt
from aclip import distributed as dist_utils
from aclip.config import (
    Config,
    ConfigError,
    check_world_size,
    config_from_yaml,
    steps_per_epoch,
    to_yaml,
)
from aclip.data.pipeline import (
    CONVERT_REASONS,
    COUNT_KEYS,
    SKIP_REASONS,
    LoaderPosition,
    SkipCounter,
    check_skip_fraction,
)
from aclip.data.views import model_input
from aclip.distributed import DistInfo
from aclip.ema import EMATeacher, ema_momentum
from aclip.losses import LossOutput, aclip_loss
from aclip.masking import TokenSelector, map_relevance_to_views
from aclip.model import build_model
from aclip.numerics import (
    NonFiniteLoss,
    StepGuard,
    engine_counters,
    grad_norm_sum,
    nonfinite_anywhere,
    set_engine_counters,
)
from aclip.optim import build_optimizer, build_scheduler
from aclip.tokenizer import Tokenizer
from aclip.visualize import kept_tokens_grid

LOSS_KEYS = ("loss", "loss_clip", "loss_simclr", "loss_byol")
CONFIG_FILE = "aclip_config.yaml"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# model keys that change how the model runs, not its weights: free to change on resume
RUNTIME_MODEL_KEYS = ("grad_checkpointing", "compile")
# what decides the shapes of the saved weights: a checkpoint resumes only if these agree
SHAPE_KEYS = {
    "model": None,  # every model key
    "loss": ("simclr_hidden", "simclr_out", "byol_hidden", "byol_out"),
}


def _shape_fields(cfg: Config) -> dict[str, Any]:
    fields = {}
    for section, keys in SHAPE_KEYS.items():
        values = vars(getattr(cfg, section))
        for key in keys or values:
            if key not in RUNTIME_MODEL_KEYS:
                fields[f"{section}.{key}"] = values[key]
    fields["loss.simclr_head"] = cfg.loss.w_simclr > 0
    fields["loss.byol_heads"] = cfg.loss.w_byol > 0
    return fields


def check_compatible(cfg: Config, tag_dir: Path) -> None:
    """Refuse to resume from a checkpoint whose model differs from ``cfg``'s, naming the keys."""
    saved_file = tag_dir / CONFIG_FILE
    if not saved_file.is_file():
        return  # written by every save; absent only for checkpoints from elsewhere
    saved, ours = _shape_fields(config_from_yaml(saved_file.read_text())), _shape_fields(cfg)
    diff = [
        f"{k}: checkpoint {saved[k]!r}, config {ours[k]!r}" for k in ours if saved[k] != ours[k]
    ]
    if diff:
        raise ConfigError(
            f"checkpoint {tag_dir} was made with another model; differing keys: " + "; ".join(diff)
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every rank the same: identical initial weights)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states a resumed run needs to continue as the uninterrupted one."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Builds model, teacher, engine and loader from a :class:`Config`; runs and checkpoints."""

    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.per_rank_batch = check_world_size(cfg, dist_info.world_size)
        self._init_schedule()
        seed_everything(cfg.train.seed)
        self.tokenizer = Tokenizer(cfg.model.context_length)
        self.model = dist_utils.convert_global_bn(build_model(cfg.model, cfg.loss)).to(self.device)
        visual = self.model.clip.visual
        self.selector = TokenSelector(
            cfg.mask.strategy, cfg.mask.keep_ratio, visual.grid_hw, cfg.mask.block_size
        )
        self._ema_source = self._teacher_student()
        self.teacher = self._build_teacher()
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, self.total_steps)
        ds_cfg = dist_utils.deepspeed_config(
            cfg.train.global_batch_size,
            self.per_rank_batch,
            self._precision(),
            cfg.train.zero_stage,
            cfg.optim.grad_clip,
        )
        self.engine = dist_utils.build_engine(self.model, optimizer, scheduler, ds_cfg)
        self.step = 0
        self.samples_seen = 0
        self.data_pos = LoaderPosition(epoch=0, num_workers=cfg.data.workers)
        self.stop_signal: int | None = None  # set by a stop signal, acted on at a step boundary
        self.numerics = StepGuard(self.model, cfg.train.max_bad_steps)  # skipped-step bookkeeping
        self._new_loader = False
        self._saved_step = -1
        self.writer = None
        self._sums: dict[str, torch.Tensor] = {}
        self._skips = SkipCounter(f"rank {dist_info.rank}: " if dist_info.world_size > 1 else "")
        self._timing = {"data": 0.0, "total": 0.0, "samples": 0, "steps": 0}

    # ----------------------------------------------------------------- set-up
    def _init_schedule(self) -> None:
        """Epoch size (``data.samples_per_epoch``, else counted from the shards' stats files and
        recorded in the config), schedule length (``total_steps``: the LR and EMA schedules run
        over it) and the step at which this run stops (``end_step``: ``train.stop_at_step`` if
        earlier); printed on rank 0."""
        from aclip.preflight import resolve_epoch_size

        self.samples_per_epoch = resolve_epoch_size(self.cfg)
        batch = self.cfg.train.global_batch_size
        self.steps_per_epoch = steps_per_epoch(self.samples_per_epoch, batch)
        self.total_steps = self.cfg.optim.total_steps or max(
            1, round(self.cfg.optim.epochs * self.steps_per_epoch)
        )
        stop = self.cfg.train.stop_at_step
        self.end_step = min(stop, self.total_steps) if stop else self.total_steps
        if self.dist.is_main:
            epochs = self.total_steps / self.steps_per_epoch
            stop_note = f", stopping at step {stop}" if self.end_step < self.total_steps else ""
            print(f"epoch: {self.samples_per_epoch} samples = {self.steps_per_epoch} steps of "
                  f"batch {batch}; schedule: {self.total_steps} steps ({epochs:g} epochs)"
                  f"{stop_note}", flush=True)  # fmt: skip

    def _precision(self) -> str:
        """bf16/fp16 need a GPU here; the CPU runs fp32."""
        return self.cfg.train.precision if self.device.type == "cuda" else "fp32"

    def _teacher_student(self) -> nn.ModuleDict:
        """The student parts the EMA teacher mirrors: vision tower, image proj, BYOL projector."""
        parts = {"visual": self.model.clip.visual, "image_proj": self.model.clip.image_proj}
        if self.model.byol_projector is not None:
            parts["byol_projector"] = self.model.byol_projector
        return nn.ModuleDict(parts)

    def _build_teacher(self) -> EMATeacher | None:
        needed = self.selector.needs_relevance or self.cfg.loss.w_byol > 0 or self.cfg.eval.use_ema
        return EMATeacher(self._ema_source) if needed else None

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the engine's weights (DeepSpeed bf16/fp16 keeps the module in it)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self._precision(), torch.float32)

    @property
    def autocast(self) -> torch.autocast:
        """bf16 autocast for the teacher pass on GPU; disabled on the CPU."""
        enabled = self.device.type == "cuda" and self._precision() == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def teacher_pass(
        self, ema_images: torch.Tensor, boxes_BV4: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """EMA view through the teacher: (keep_idx [B*V, k] or None, BYOL target, relevance_BN)."""
        batch, views = boxes_BV4.shape[:2]
        if self.teacher is None:
            keep = self.selector.select(None, batch * views, self._mask_generator(), self.device)
            return keep, None, None
        teacher = self.teacher.module
        with self.autocast:
            pooled_BW, relevance_BN = teacher["visual"].forward_with_relevance(ema_images)
            target = teacher["byol_projector"](pooled_BW) if "byol_projector" in teacher else None
        relevance_BN = relevance_BN.float()
        mapped = None
        if self.selector.needs_relevance:
            grid = teacher["visual"].grid_hw
            mapped = map_relevance_to_views(relevance_BN, grid, boxes_BV4, grid).flatten(0, 1)
        keep = self.selector.select(mapped, batch * views, self._mask_generator(), self.device)
        return keep, (target.float() if target is not None else None), relevance_BN

    def _mask_generator(self) -> torch.Generator:
        """Random masking draws from (seed, rank, step): reproducible and exact on resume."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.cfg.train.seed * 1_000_003 + self.dist.rank) * 1_000_003 + self.step)
        return gen

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's part of the global batch; returns detached losses.

        When the loss or a gradient is NaN/Inf on any rank, every rank skips the step alike
        (nothing changes but the data position; ``self.numerics.last_skipped`` is set) and
        ``train.max_bad_steps`` skips in a row save a checkpoint and raise `NonFiniteLoss`.
        """
        # the loader sends uint8 pixels (4x fewer bytes); normalised here, on the device
        views = model_input(batch["views"].to(self.device, non_blocking=True), self.input_dtype)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        ema = model_input(batch["ema"].to(self.device, non_blocking=True))
        boxes = batch["boxes"].to(self.device, non_blocking=True).float()
        batch_size, num_views = views.shape[:2]
        keep_idx, byol_target, _ = self.teacher_pass(ema, boxes)
        self.numerics.snapshot()
        out = self.engine(views.flatten(0, 1), tokens, keep_idx)
        loss = self._loss(out, byol_target, batch_size, num_views)
        self.samples_seen += batch_size * self.dist.world_size  # the data position moves on
        bad = self._backward_and_step(loss.total)
        if bad:
            self._skip_step(bad)
        else:
            self.ema_update()
            self.step += 1
            self.numerics.good()
        terms = (loss.total, loss.clip, loss.simclr, loss.byol)
        return {key: val.detach() for key, val in zip(LOSS_KEYS, terms, strict=True)}

    def _loss(
        self, out: dict[str, Any], byol_target: torch.Tensor | None, batch: int, views: int
    ) -> LossOutput:
        def per_view(x: torch.Tensor | None) -> list[torch.Tensor] | None:
            return None if x is None else list(x.float().view(batch, views, -1).unbind(1))

        return aclip_loss(
            per_view(out["image_emb"]),
            out["text_emb"].float(),
            out["logit_scale_exp"].float(),
            per_view(out.get("simclr_z")),
            per_view(out.get("byol_pred")),
            byol_target,
            self.cfg.loss.w_simclr,
            self.cfg.loss.w_byol,
            self.cfg.loss.simclr_temperature,
        )

    def momentum(self) -> float:
        """EMA momentum for the update after the current step (cosine schedule)."""
        return ema_momentum(
            self.step, self.total_steps, self.cfg.ema.momentum, self.cfg.ema.final_momentum
        )

    def ema_update(self) -> None:
        """Move the teacher toward the student (after each optimizer step)."""
        if self.teacher is not None:
            self.teacher.update(self._ema_source, self.momentum())

    def _backward_and_step(self, loss: torch.Tensor) -> str:
        """Backward and optimizer step, unless the loss or a gradient is NaN/Inf on any rank.

        Returns "" when the step was applied, else "loss" or "gradients". DeepSpeed's own
        optimizers (ZeRO 1/2, bf16, fp16) find non-finite gradients themselves (global grad
        norm, all-reduced) and skip; the loss is checked before backward (all-reduced, so every
        rank runs backward's collectives or none). A plain fp32 optimizer (ZeRO 0) has no such
        check: loss and gradients (all-reduced in backward) are checked together before stepping.
        """
        if hasattr(self.engine.optimizer, "overflow"):
            if nonfinite_anywhere(loss)[0]:
                return "loss"
            self.engine.backward(loss)
            counters = engine_counters(self.engine)
            self.engine.step()
            if self.engine.was_step_applied():
                return ""
            set_engine_counters(self.engine, counters)  # a skipped step is not a step
            return "gradients"
        self.engine.backward(loss)
        grads = grad_norm_sum(self.model.parameters(), loss.device)
        checked = torch.stack([loss.detach().float(), grads])
        bad_loss, bad_grads = nonfinite_anywhere(checked)
        if bad_loss or bad_grads:
            self.engine.zero_grad()
            return "loss" if bad_loss else "gradients"
        self.engine.step()
        return ""

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

    # ----------------------------------------------------------------- loop
    def build_loader(self) -> Any:
        """This rank's training loader at ``self.data_pos``: a stream seeded by the samples seen
        when it began, fast-forwarded past the batches already consumed from it."""
        from aclip.data.pipeline import build_train_loader
        from aclip.data.views import ACLIPViews

        data, model = self.cfg.data, self.cfg.model
        views = ACLIPViews(
            model.image_size,
            num_views=self.cfg.mask.num_views,
            scale=(data.crop_scale_min, 1.0),
            color_aug=data.color_aug,
            normalize=False,  # uint8 views: train_step normalises them on the device
        )
        return build_train_loader(
            data.train_shards,
            self.tokenizer,
            views,
            self.per_rank_batch,
            data.workers,
            weights=data.weights,
            resampled=data.resampled,
            shuffle_buffer=data.shuffle_buffer,
            seed=self.cfg.train.seed,
            **self.data_pos.loader_kwargs(),
        )

    def _start_new_stream(self) -> None:
        """Begin a fresh data stream at the current position (seeded by the samples seen)."""
        self.data_pos = LoaderPosition(epoch=self.samples_seen, num_workers=self.cfg.data.workers)
        self._new_loader = True

    def fit(self, loader: Any | None = None) -> bool:
        """Train until ``end_step``, logging, checkpointing and showing progress on rank 0.

        A finite loader (``data.resampled=false``) is rebuilt when it runs out, with its
        shuffling seeded by the new data position; with a resampled stream a new stream begins
        at each periodic checkpoint, so that resuming from it reads nothing twice. On SIGUSR1 or
        SIGTERM every rank stops at the same step boundary after saving a checkpoint: returns
        False then (``self.stop_signal`` says which), True when training is done.
        """
        from tqdm import tqdm

        self._open_run_dir()
        bar = tqdm(
            total=self.end_step, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (self.dist.is_main and self.cfg.train.progress),
        )  # fmt: skip
        own_loader = loader is None
        stream = self._batch_stream(loader)
        with _catch_stop_signals(self):
            while self.step < self.end_step:
                if self._should_stop():
                    bar.close()
                    self._stop_for_signal()
                    return False
                t0 = time.perf_counter()
                batch = next(stream)
                if "data_pos" in batch:
                    self.data_pos.update(batch)
                t1, before = time.perf_counter(), self.step
                losses = self.train_step(batch)
                if self.step == before:  # non-finite, skipped: no step to log or save
                    if "skipped" in batch:
                        self._skips.update(batch)
                    continue
                self._accumulate(losses, t1 - t0, time.perf_counter() - t0, batch)
                self._after_step(bar, batch, own_loader)
        bar.close()
        self.save_checkpoint()  # a no-op when this step is saved already
        return True

    def _batch_stream(self, loader: Any | None) -> Iterator[dict]:
        """Batches without end: from ``loader`` (or our own), rebuilt when a finite one runs out
        (next epoch) and when a new stream is due; an empty one is an error at once."""
        own_loader = loader is None
        batches, fresh = iter(self.build_loader() if own_loader else loader), True
        while True:
            if self._new_loader and own_loader:
                batches, fresh, self._new_loader = iter(self.build_loader()), True, False
                self._skips.new_loader()
            batch = next(batches, None)
            if batch is None:
                if fresh:
                    raise RuntimeError(
                        f"the training data yielded no batch: {self.cfg.data.train_shards}"
                    )
                self._start_new_stream()  # the next epoch of a finite stream
                batches, fresh, self._new_loader = iter(self.build_loader()), True, False
                self._skips.new_loader()
                continue
            fresh = False
            yield batch

    def _should_stop(self) -> bool:
        """Whether any rank got a stop signal; asked every ``train.signal_check_every`` steps
        (one small all-reduce), so that all ranks stop at the same step."""
        every = max(1, self.cfg.train.signal_check_every)
        if self.step % every != 0:
            return False
        flag = torch.tensor([float(self.stop_signal or 0)], device=self.device)
        got = int(dist_utils.all_reduce_max(flag).item())
        if got:
            self.stop_signal = got
        return bool(got)

    def _stop_for_signal(self) -> None:
        """Save the state at this step boundary so that the next start resumes here."""
        path = self.save_checkpoint()
        if self.dist.is_main:
            name = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
            print(f"preempted at step {self.step} ({name}): checkpoint saved in {path}",
                  flush=True)  # fmt: skip

    def _accumulate(
        self, losses: dict[str, torch.Tensor], wait: float, total: float, batch: dict
    ) -> None:
        for key, val in losses.items():
            self._sums[key] = self._sums.get(key, 0) + val
        self._timing["data"] += wait
        self._timing["total"] += total
        self._timing["samples"] += batch["views"].shape[0] * self.dist.world_size
        self._timing["steps"] += 1
        if "skipped" in batch:
            self._skips.update(batch)

    def _after_step(self, bar: Any, batch: dict, own_loader: bool = False) -> None:
        cfg = self.cfg.train
        bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == self.end_step:
            scalars = self._flush_scalars()
            bar.set_postfix(
                skipped=self._skips.skipped(),
                bad_steps=self.numerics.skipped,
                loss=f"{scalars['loss/total']:.3f}",
                sps=f"{scalars['perf/samples_per_s']:.0f}",
            )
            if self.dist.is_main and not cfg.progress:
                print(f"step {self.step}/{self.end_step} loss {scalars['loss/total']:.4f} "
                      f"samples/s {scalars['perf/samples_per_s']:.0f}", flush=True)  # fmt: skip
        if cfg.image_log_every and (self.step % cfg.image_log_every == 0 or self.step == 1):
            self._log_kept_tokens(batch)
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
            if own_loader and self.cfg.data.resampled and self.step < self.end_step:
                self._start_new_stream()  # resuming here then reads no sample twice
            self.save_checkpoint()
        if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0:
            self.periodic_eval()

    def evaluate(self) -> dict[str, dict[str, float]]:
        """The configured eval sets on the online model (rank 0; other ranks get {})."""
        results: dict[str, dict[str, float]] = {}
        if self.dist.is_main:
            from aclip.evaluation import evaluate_sets

            with self.autocast:
                ev = self.cfg.eval
                results = evaluate_sets(
                    self.model.clip, self.tokenizer, ev.zeroshot_sets, ev.retrieval_sets,
                    self.cfg.model.image_size, ev.batch_size, self.device,
                )  # fmt: skip
        dist_utils.barrier()
        return results

    def periodic_eval(self) -> None:
        """:meth:`evaluate` and log ``eval/<kind>/<set>/<metric>`` to tensorboard."""
        for name, metrics in self.evaluate().items():
            for metric, value in metrics.items():
                if self.writer is not None and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{name}/{metric}", value, self.step)

    def _flush_scalars(self) -> dict[str, float]:
        """Average the interval's losses over steps and ranks (one sync), write tensorboard."""
        n_steps = max(1, self._timing["steps"])
        losses = torch.stack([self._sums[k] for k in LOSS_KEYS]).float().cpu() / n_steps
        totals = self._skips.totals()
        counts = torch.tensor([float(totals[k]) for k in COUNT_KEYS])
        reduced = dist_utils.all_reduce_mean(torch.cat([losses, counts]).to(self.device)).cpu()
        means = reduced[: len(LOSS_KEYS)].tolist()
        counts_all = dict(zip(COUNT_KEYS, (reduced[len(LOSS_KEYS) :] * self.dist.world_size)
                              .round().long().tolist(), strict=True))  # fmt: skip
        self._check_data_health(counts_all)
        t = self._timing
        visual = self.model.clip.visual
        kept = self.selector.k / visual.num_patches if self.selector.k else 1.0
        scalars = {
            "loss/total": means[0],
            "loss/clip": means[1],
            "loss/simclr": means[2],
            "loss/byol": means[3],
            "train/lr": self.engine.get_lr()[0],
            "train/logit_scale": float(self.model.clip.logit_scale_exp().item()),
            "train/ema_momentum": self.momentum(),
            "train/kept_fraction": kept,
            "train/skipped_steps": float(self.numerics.skipped),
            "perf/samples_per_s": t["samples"] / max(t["total"], 1e-9),
            "perf/data_wait_fraction": t["data"] / max(t["total"], 1e-9),
            "data/skipped": float(sum(counts_all[k] for k in SKIP_REASONS)),
            "data/converted": float(sum(counts_all[k] for k in CONVERT_REASONS)),
        } | {f"data/{key}": float(val) for key, val in counts_all.items() if val}
        if self.writer is not None:
            for key, val in scalars.items():
                self.writer.add_scalar(key, val, self.step)
        self._sums = {}
        self._timing = {"data": 0.0, "total": 0.0, "samples": 0, "steps": 0}
        return scalars

    def _check_data_health(self, counts_all: dict[str, int]) -> None:
        """Stop (on every rank alike: the counts are summed over ranks) when more than
        ``data.max_skip_fraction`` of the samples read were bad, naming recent bad shards."""
        check_skip_fraction(
            counts_all, self.samples_seen, self.cfg.data.max_skip_fraction,
            self._skips.recent_bad_shards(),
        )  # fmt: skip

    def _log_kept_tokens(self, batch: dict[str, torch.Tensor], n: int = 4) -> None:
        if self.writer is None:
            return
        views = model_input(batch["views"][:n].to(self.device))
        ema = model_input(batch["ema"][:n].to(self.device))
        keep, _, relevance = self.teacher_pass(ema, batch["boxes"][:n].to(self.device).float())
        grid = kept_tokens_grid(
            views[:, 0],
            None if keep is None else keep.view(len(views), -1, keep.shape[-1])[:, 0],
            self.model.clip.visual.grid_hw,
            ema,
            relevance,
        )
        self.writer.add_image("masking/kept_tokens", grid, self.step)

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
        """Engine (weights, optimizer, LR schedule) + EMA + step, and per rank its data position,
        skip counts and RNG; visible (``latest``) only once every rank has written its part."""
        tag = f"step_{self.step:08d}"
        tag_dir = self.ckpt_dir / tag
        if self._saved_step == self.step and (tag_dir / ckpt.MANIFEST).is_file():
            return tag_dir  # this step's state is saved already (e.g. skipped steps since)
        if self.dist.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an unfinished or stale save of this step
        dist_utils.barrier()
        client = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "ema": self.teacher.state_dict() if self.teacher is not None else None,
            "config": to_yaml(self.cfg),
        }
        self.engine.save_checkpoint(
            str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False
        )
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self._rank_state(), tag_dir / f"rank_{self.dist.rank:05d}.pt")
        dist_utils.barrier()
        if self.dist.is_main:
            (tag_dir / CONFIG_FILE).write_text(client["config"])
            ckpt.commit_checkpoint(self.ckpt_dir, tag)
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        dist_utils.barrier()
        self._saved_step = self.step
        return tag_dir

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: data position, skip counts, RNG."""
        return {
            "world_size": self.dist.world_size,
            "data": self.data_pos.state_dict(),
            "skips": self._skips.totals(),
            "rng": rng_state(),
        }

    def resume(self, which: str = "latest") -> bool:
        """Load the newest whole checkpoint (``latest``; a damaged one is passed over for the
        one before) or a given tag directory; returns False when there is none."""
        tag_dir = self._checkpoint_to_load(which)
        if tag_dir is None:
            return False
        check_compatible(self.cfg, tag_dir)
        load_path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if load_path is None:
            raise FileNotFoundError(f"no loadable checkpoint in {tag_dir}")
        self.step, self.samples_seen = int(client["step"]), int(client["samples_seen"])
        self._saved_step = self.step
        if self.teacher is not None and client.get("ema") is not None:
            self.teacher.load_state_dict(client["ema"])
        self._load_rank_state(tag_dir, client)
        return True

    def _checkpoint_to_load(self, which: str) -> Path | None:
        """Rank 0 picks the tag directory (verifying files), every rank gets the same one."""
        if which not in ("", "latest"):
            tag_dir = Path(which)
            problem = ckpt.checkpoint_problem(tag_dir)
            if problem:
                raise FileNotFoundError(f"checkpoint {tag_dir} is not usable: {problem}")
            return tag_dir
        tag = None
        if self.dist.is_main and self.ckpt_dir.is_dir():
            tag = ckpt.choose_checkpoint(self.ckpt_dir)
        tag = dist_utils.broadcast_object(tag)
        return None if tag is None else self.ckpt_dir / tag

    def _load_rank_state(self, tag_dir: Path, client: dict[str, Any]) -> None:
        """Data position, skip counts and RNG of this rank; with another world size or number of
        workers the data stream restarts at the samples seen (not sample-exact)."""
        path = tag_dir / f"rank_{self.dist.rank:05d}.pt"
        state = torch.load(path, weights_only=False) if path.is_file() else None
        pos = LoaderPosition.from_state(state["data"]) if state else None
        if (
            state is None
            or state["world_size"] != self.dist.world_size
            or pos is None
            or pos.num_workers != self.cfg.data.workers
        ):
            if self.dist.is_main:
                print(f"note: {tag_dir} was saved with another world size or number of data "
                      f"workers; the data stream restarts at sample {self.samples_seen}",
                      flush=True)  # fmt: skip
            self.data_pos = LoaderPosition(self.samples_seen, self.cfg.data.workers)
            if client.get("rng") is not None:
                set_rng_state(client["rng"])
            return
        self.data_pos = pos
        self._skips.restore(state["skips"])
        set_rng_state(state["rng"])

    def write_results(self, results: dict[str, Any]) -> None:
        """Final metrics as JSON beside the checkpoints (rank 0)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))

    def close(self) -> None:
        """Flush logs."""
        if self.writer is not None:
            self.writer.close()


class _catch_stop_signals:
    """Within the block, SIGUSR1 / SIGTERM / SIGINT only set ``trainer.stop_signal`` (the loop
    saves and stops at the next check); a second SIGINT interrupts at once (KeyboardInterrupt).
    The previous handlers come back afterwards. Main thread only."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.saved: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.trainer.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum

    def __enter__(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
