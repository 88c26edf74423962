"""Typed run configuration: one dataclass per component.

Layers merge as defaults < YAML file < dotted command-line overrides (``model.image_size=64``).
A YAML file may name another as its ``base:`` (a path relative to the file) and give only its
differences; the base's own base is read first, and so on (defaults < base chain < file).
OmegaConf structured configs give the type checks: an unknown key or a value of the wrong type is
refused, naming the key, before any heavy work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run: names the offending key and why."""


# eval.precision and the eval CLIs' --precision (aclip.eval.evaluate.eval_autocast)
EVAL_PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "amp")


@dataclass
class ModelConfig:
    """Vision tower (any timm ViT), CLIP text tower and the joint embedding."""

    vision_model: str = "vit_base_patch16_224"
    image_size: int = 224
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze_patch_embed: bool = False
    patch_stem: str = "linear"  # patch embedding: linear (ViT's patch conv) or conv (a conv stem)
    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_act: str = "gelu"  # text MLP activation: gelu, or quick_gelu (OpenAI CLIP weights)
    alpha_channel: bool = False  # Alpha-CLIP: a zero-initialised alpha conv beside the patch conv
    init_from: str = ""  # pretrained weights to start from (OpenAI / open_clip / aclip run)
    init_from_name: str = ""  # open_clip model name (or open_clip_config.json) for a bare file
    init_temperature: float = 0.07  # logit scale starts at ln(1 / init_temperature) (InfoNCE)
    text_token_drop: float = 0.0  # training: hide each caption token with this probability
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    compile: bool = False  # torch.compile the student's forward (ACLIPModel)


@dataclass
class MaskConfig:
    """Token selection for the online views: none (CLIP), random (FLIP), attentive (A-CLIP)."""

    strategy: str = "attentive"
    keep_ratio: float = 0.5
    block_size: int = 1
    num_views: int = 2


@dataclass
class LossConfig:
    """Loss weights and self-supervised head sizes (docs/design.md, A-CLIP step 6)."""

    # image-text term: infonce (CLIP's softmax, the default) or siglip (SigLIP's sigmoid loss,
    # aclip.methods.losses.siglip: the model then gets a learnable logit bias). A siglip model
    # starts at t = siglip_init_scale (logit_scale = ln t) and b = siglip_init_bias (open_clip's
    # init_logit_scale ln 10 / init_logit_bias -10 for SigLIP) instead of model.init_temperature,
    # which is InfoNCE's start only (a siglip run refuses a changed one).
    contrastive: str = "infonce"
    siglip_init_scale: float = 10.0
    siglip_init_bias: float = -10.0
    w_simclr: float = 1.0
    w_byol: float = 2.0
    simclr_temperature: float = 0.1
    simclr_hidden: int = 4096
    simclr_out: int = 256
    byol_hidden: int = 4096
    byol_out: int = 256
    # caption-token classification (SuperClass, Huang et al. 2024): the image embedding predicts
    # the caption's words through a linear head over the vocabulary; w_text_bow: the caption's
    # own embedding predicts them through the same head (so the text tower keeps every word)
    w_caption_bow: float = 0.0
    w_text_bow: float = 0.0
    # weight each caption word by its inverse document frequency in the global batch
    # (SuperClass's IDF; aclip.methods.losses.batch_idf)
    caption_bow_idf: bool = False

    @property
    def caption_words(self) -> bool:
        """Whether either caption-word term is on (the student then has the word head)."""
        return self.w_caption_bow > 0 or self.w_text_bow > 0


@dataclass
class EMAConfig:
    """Teacher momentum, cosine from ``momentum`` to ``final_momentum`` over training, and the
    resolution the teacher sees the EMA view at (``image_size``; 0: the model's image size)."""

    momentum: float = 0.996
    final_momentum: float = 1.0
    image_size: int = 0  # e.g. 112 for a 224 model: ~1/4 of the teacher's FLOPs (issue 16)


@dataclass
class DataConfig:
    """Training shards (img2dataset layout) and the loader."""

    train_shards: str = ""
    weights: list[float] | None = None
    samples_per_epoch: int | None = None
    resampled: bool = True
    shuffle_buffer: int = 2000
    workers: int = 4
    crop_scale_min: float = 0.5
    color_aug: bool = True
    augment_on: str = "cpu"  # cpu: views made by the loader; gpu: crops/resizes/colour on device
    max_skip_fraction: float = 0.1


@dataclass
class ParamGroupConfig:
    """One rule of ``optim.param_groups``: the parameters it matches get their own learning rate
    (``lr_scale`` x ``optim.lr``, on the same schedule), weight decay, or are frozen.

    ``pattern`` matches a parameter's name in the student (``clip.visual.alpha_conv.weight``)
    as an fnmatch pattern (``clip.text*``), or a module's name (``clip.visual``: all of its
    parameters). The first rule that matches a parameter decides it.
    """

    pattern: str = ""
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: optim.weight_decay (biases, norms: always none)
    frozen: bool = False


@dataclass
class OptimConfig:
    """AdamW with per-step linear warm-up and cosine decay."""

    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_epochs: float = 1.0
    epochs: float = 25.0
    total_steps: int = 0  # length of training and of the LR/EMA schedules; 0: epochs x steps/epoch
    grad_clip: float = 0.0
    # torch's fused AdamW kernel (one pass over each parameter, CPU and CUDA) instead of the
    # multi-tensor (foreach) one: the same update up to rounding, several times faster where the
    # optimizer is a large part of the step (a big vocabulary on a small model: make demo)
    fused: bool = False
    # per-parameter-group learning rates, weight decay and freezing (any method); see
    # ParamGroupConfig. Parameters no rule matches keep optim.lr and optim.weight_decay.
    param_groups: list[ParamGroupConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Evaluation sets run during and after training (CLIP_benchmark wds layout)."""

    zeroshot_sets: list[str] = field(default_factory=list)
    retrieval_sets: list[str] = field(default_factory=list)
    region_sets: list[str] = field(default_factory=list)  # wds sets with .mask.png (Alpha-CLIP)
    every_steps: int = 0
    batch_size: int = 256
    use_ema: bool = False
    # the evaluations' arithmetic (one rule with the eval CLIs' --precision): fp32 (the fp32
    # weights, no autocast), amp_bf16 / amp_fp16 (autocast to that dtype), amp (CLIP_benchmark's
    # default: torch.autocast's dtype, fp16 on CUDA, bf16 on CPU); see aclip.eval.evaluate
    precision: str = "fp32"


@dataclass
class AlphaConfig:
    """Alpha-CLIP's region-text samples and loss (``method=alpha_clip``; docs in README)."""

    full_image_prob: float = 0.1  # chance of a (full caption, all-ones alpha) pair per sample
    view: str = "pad"  # pad: whole image padded to a square (official code); crop: random crop
    label_smoothing: float = 0.1  # InfoNCE label smoothing (official code)
    # false (official code): the gathered features carry no gradient, so the images train
    # through the image->text term alone; true: both InfoNCE terms train the images (the exact
    # gradient of the symmetric loss). The loss value is the same
    # (aclip.methods.losses.no_grad_columns)
    symmetric_grad: bool = False


@dataclass
class TrainConfig:
    """Run-level settings: batch, precision, DeepSpeed, logging and checkpoints."""

    output_dir: str = "runs/default"
    global_batch_size: int = 4096
    accum_freq: int = 1  # micro-batches per rank and step; negatives still span the whole batch
    precision: str = "bf16"
    zero_stage: int = 1
    seed: int = 0
    log_every: int = 10
    image_log_every: int = 500
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    signal_check_every: int = 10
    resume: str = ""
    # read a resumed or init_from checkpoint even if it holds types beyond weights and aclip's
    # own (unpickling it can run code: only for files you trust; aclip.interop.safe_load)
    trust_checkpoint: bool = False
    stop_at_step: int = 0  # stop early after this step, schedules unchanged (0: at their end)
    progress: bool = True
    max_bad_steps: int = 20  # NaN/Inf loss or gradient: step skipped; this many in a row stop


@dataclass
class Config:
    """The whole run: the training method (``aclip``, ``clip``, ``flip``, ``alpha_clip``; see
    aclip.methods) and one section per component."""

    method: str = "aclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Merge defaults < ``path``'s ``base:`` chain < YAML ``path`` < dotted ``overrides`` and
    validate the result.

    Raises:
        ConfigError: on an unknown key, a wrong type, a missing file, a base that is missing or
            makes a cycle, or an invalid value.
    """
    layers = [OmegaConf.structured(Config)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.extend(_file_layers(path))
    if overrides:
        _check_override_syntax(overrides)
        layers.append(_refuse_removed_keys(OmegaConf.from_dotlist(list(overrides)), "overrides"))
    try:
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    validate(cfg)
    return cfg


BASE_KEY = "base"  # a config file's parent: ``base: demo.yaml`` (relative to the file)


def _file_layers(path: Path) -> list[Any]:
    """The YAML layers of config file ``path``: its ``base:`` chain, the farthest base first and
    ``path`` last, each without its ``base`` key. A missing base or a cycle is a ConfigError
    naming the file that names the base and the base."""
    layers: list[Any] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        seen.append(current.resolve())
        layer = _refuse_removed_keys(OmegaConf.load(current), str(current))
        base = layer.pop(BASE_KEY, None) if isinstance(layer, DictConfig) else None
        layers.insert(0, layer)
        current = None if base is None else _base_path(current, base, seen)
    return layers


def _base_path(child: Path, base: Any, seen: list[Path]) -> Path:
    """The file ``child``'s ``base:`` names, checked: a path string, an existing file, not
    already in the chain."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {child}: '{BASE_KEY}' must name a YAML file (got {base!r})")
    path = child.parent / base
    if not path.is_file():
        raise ConfigError(f"config file {child}: its base {path} is not found")
    if path.resolve() in seen:
        raise ConfigError(
            f"config file {child}: its base {path} is already in the chain it starts (a cycle)"
        )
    return path


# keys of earlier versions: what to use instead (a user's config naming one is refused)
REMOVED_KEYS = {
    "train.max_steps": "it shortened the LR and EMA schedules as well as stopping; use "
    "train.stop_at_step=N to stop early with the schedules unchanged, or optim.total_steps=N "
    "for a shorter run with its schedules fitted to it",
}


def _refuse_removed_keys(layer: Any, where: str) -> Any:
    for key, instead in REMOVED_KEYS.items():
        if OmegaConf.select(layer, key) is not None:
            raise ConfigError(f"config key '{key}' ({where}) was removed: {instead}")
    return layer


def _drop_removed_keys(layer: Any) -> Any:
    """A run's saved config from an earlier version, without the keys since removed."""
    for key in REMOVED_KEYS:
        section, name = key.split(".")
        if OmegaConf.select(layer, section) is not None and name in layer[section]:
            layer[section].pop(name)
    return layer


def config_from_yaml(text: str) -> Config:
    """A :class:`Config` from the YAML text a run wrote (``config.yaml`` or a checkpoint);
    keys removed since that run was made are dropped."""
    try:
        saved = _drop_removed_keys(OmegaConf.create(text))
        merged = OmegaConf.merge(OmegaConf.structured(Config), saved)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None


def _check_override_syntax(overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def validate(cfg: Config) -> None:
    """Refuse values that type checks cannot catch, naming the key."""
    checks = [
        (
            0.0 < cfg.mask.keep_ratio <= 1.0,
            "mask.keep_ratio",
            f"must be in (0, 1] (got {cfg.mask.keep_ratio})",
        ),
        (cfg.mask.num_views >= 1, "mask.num_views", "must be >= 1"),
        (
            cfg.model.text_act in ("gelu", "quick_gelu"),
            "model.text_act",
            f"must be gelu or quick_gelu (got {cfg.model.text_act!r})",
        ),
        (
            cfg.model.init_temperature >= 0.01,
            "model.init_temperature",
            f"must be >= 0.01, the logit scale's clamp (got {cfg.model.init_temperature})",
        ),
        *_siglip_checks(cfg),
        (cfg.mask.block_size >= 1, "mask.block_size", "must be >= 1"),
        (cfg.model.image_size >= 1, "model.image_size", "must be >= 1 (pixels per side)"),
        (0.0 <= cfg.model.text_token_drop < 1.0, "model.text_token_drop", "must be in [0, 1)"),
        (
            cfg.train.precision in ("fp32", "bf16", "fp16", "amp_bf16"),
            "train.precision",
            f"must be fp32, bf16, fp16 or amp_bf16 (got {cfg.train.precision!r})",
        ),
        (cfg.train.zero_stage in (0, 1, 2), "train.zero_stage", "must be 0, 1 or 2"),
        (
            cfg.eval.precision in EVAL_PRECISIONS,
            "eval.precision",
            f"must be one of {', '.join(EVAL_PRECISIONS)} (got {cfg.eval.precision!r})",
        ),
        (
            cfg.train.precision in ("fp32", "amp_bf16") or cfg.train.zero_stage >= 1,
            "train.zero_stage",
            f"{cfg.train.precision} needs ZeRO 1 or 2: DeepSpeed's stage-0 half-precision "
            "optimizer keeps its fp32 master weights where neither evaluation, export nor the "
            "logit-scale clamp can reach them (use train.zero_stage=1, or train.precision=amp_bf16 "
            "for fp32 weights with bf16 compute)",
        ),
        (cfg.train.global_batch_size >= 1, "train.global_batch_size", "must be >= 1"),
        (cfg.train.accum_freq >= 1, "train.accum_freq", "must be >= 1"),
        (0.0 < cfg.data.crop_scale_min <= 1.0, "data.crop_scale_min", "must be in (0, 1]"),
        (
            cfg.data.augment_on in ("cpu", "gpu"),
            "data.augment_on",
            f"must be cpu or gpu (got {cfg.data.augment_on!r})",
        ),
        (0.0 <= cfg.data.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in [0, 1]"),
        (
            (cfg.data.samples_per_epoch or 0) >= 0,
            "data.samples_per_epoch",
            f"must be >= 1, or unset (or 0) to count it from the shards' stats files (got "
            f"{cfg.data.samples_per_epoch})",
        ),
        (len(cfg.optim.betas) == 2, "optim.betas", "must hold two numbers"),
        (cfg.optim.lr > 0, "optim.lr", "must be > 0"),
        (cfg.optim.total_steps >= 0, "optim.total_steps", "must be >= 0 (0: from optim.epochs)"),
        (cfg.train.stop_at_step >= 0, "train.stop_at_step", "must be >= 0 (0: no early stop)"),
        (cfg.loss.w_simclr >= 0 and cfg.loss.w_byol >= 0, "loss.w_simclr/w_byol", "must be >= 0"),
        (
            cfg.loss.w_caption_bow >= 0 and cfg.loss.w_text_bow >= 0,
            "loss.w_caption_bow/w_text_bow",
            "must be >= 0",
        ),
        (
            cfg.method != "alpha_clip" or not cfg.loss.caption_words,
            "loss.w_caption_bow/w_text_bow",
            "are not used by method alpha_clip (its text tower is frozen): leave them at 0",
        ),
        (
            0.0 <= cfg.ema.momentum <= cfg.ema.final_momentum <= 1.0,
            "ema.momentum",
            "need 0 <= ema.momentum <= ema.final_momentum <= 1",
        ),
        (cfg.ema.image_size >= 0, "ema.image_size", "must be >= 0 (0: the model's image size)"),
    ]
    for ok, key, why in checks + _alpha_checks(cfg.alpha):
        if not ok:
            raise ConfigError(f"config key '{key}': {why}")
    _check_param_groups(cfg.optim.param_groups)


def _siglip_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    loss, siglip = cfg.loss, cfg.loss.contrastive == "siglip"
    return [
        (
            loss.contrastive in ("infonce", "siglip"),
            "loss.contrastive",
            f"must be infonce or siglip (got {loss.contrastive!r})",
        ),
        (
            1.0 <= loss.siglip_init_scale <= 100.0,
            "loss.siglip_init_scale",
            f"must be in [1, 100], the logit scale's clamp (got {loss.siglip_init_scale})",
        ),
        (
            not siglip or cfg.model.init_temperature == ModelConfig.init_temperature,
            "model.init_temperature",
            "is InfoNCE's start; a loss.contrastive=siglip run starts from "
            "loss.siglip_init_scale / loss.siglip_init_bias (leave init_temperature at 0.07)",
        ),
        (
            not siglip or cfg.method != "alpha_clip",
            "loss.contrastive",
            "siglip is not available for method alpha_clip: its InfoNCE has Alpha-CLIP's own "
            "gradient rule (no-grad gathered columns), label smoothing and a fixed ln 100 scale",
        ),
    ]


def _alpha_checks(alpha: AlphaConfig) -> list[tuple[bool, str, str]]:
    return [
        (0.0 <= alpha.full_image_prob <= 1.0, "alpha.full_image_prob", "must be in [0, 1]"),
        (alpha.view in ("pad", "crop"), "alpha.view", f"must be pad or crop (got {alpha.view!r})"),
        (0.0 <= alpha.label_smoothing < 1.0, "alpha.label_smoothing", "must be in [0, 1)"),
    ]


def _check_param_groups(rules: list[ParamGroupConfig]) -> None:
    """Each rule names a pattern, a non-negative lr scale and weight decay."""
    for i, rule in enumerate(rules):
        key = f"optim.param_groups[{i}]"
        if not rule.pattern.strip():
            raise ConfigError(f"config key '{key}.pattern': must name parameters (got '')")
        if rule.lr_scale < 0:
            raise ConfigError(f"config key '{key}.lr_scale': must be >= 0 (got {rule.lr_scale})")
        if rule.weight_decay is not None and rule.weight_decay < 0:
            raise ConfigError(f"config key '{key}.weight_decay': must be >= 0")


def check_world_size(cfg: Config, world_size: int) -> int:
    """Return the per-rank batch; refuse a global batch that does not divide over the ranks and
    their ``train.accum_freq`` micro-batches."""
    batch, accum = cfg.train.global_batch_size, cfg.train.accum_freq
    if batch % (world_size * accum):
        raise ConfigError(
            f"config key 'train.global_batch_size': {batch} does not divide over {world_size} "
            f"ranks x {accum} micro-batches (train.accum_freq)"
        )
    return batch // world_size


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as written next to a run's logs and checkpoints."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def steps_per_epoch(samples_per_epoch: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch (at least one)."""
    return max(1, math.ceil(samples_per_epoch / global_batch_size))
