"""CLIPer's fine-grained compensation: Stable Diffusion self-attention as a pixel affinity.

Optional: needs diffusers (``pip install 'aclip-pretrain[dense]'``) and a local diffusers
folder of the weights (``unet/``, ``vae/``, ``scheduler/``; SD 2.1-base for the paper's setting);
nothing is downloaded. Steps, after linsun449/cliper.code (``diffusion_model/stable_diffusion.py``,
``Processor.py``, ``ovs/pipeline.py`` ``refinement``):

1. the RGB image in [0, 1] is resized to the UNet's sample size × the VAE's factor (512 for
   SD 2.1-base) by nearest neighbour (what diffusers' ``VaeImageProcessor.preprocess`` does to a
   tensor), scaled to [-1, 1] and encoded (latent mean × ``scaling_factor``);
2. ``scheduler.set_timesteps(50)``, t = ``timesteps[45]``, noise added at t (seeded here; the
   official code draws it unseeded);
3. one UNet pass with the empty prompt's text embedding records the self-attention
   probabilities [heads, T, T] of ``up_blocks[3].attentions[1]`` and ``[0]``
   ``.transformer_blocks[0].attn1`` (CLIPer's layers -4 and -6, in that order; 64×64 tokens);
4. each map is divided by its column max (+1e-5), values under ``attention_thr`` zeroed, rows
   normalised (+1e-5); ``sfsa`` multiplies all maps into one affinity (in the recorded order),
   ``mean`` averages them;
5. the coarse maps [Q, h, w], resized (bilinear) to the token grid, are refined as A · maps.

The empty-prompt embedding comes from the folder's ``text_encoder/`` and ``tokenizer/`` (needs
``transformers``) or from ``empty_prompt_embeds.safetensors`` (key ``prompt_embeds``, [1, 77, D]).
"""

from __future__ import annotations

import json
import math
from functools import reduce
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_LAYERS: tuple[str, ...] = (
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
)
EMPTY_PROMPT_FILE = "empty_prompt_embeds.safetensors"


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Stable Diffusion refinement needs diffusers: pip install 'aclip-pretrain[dense]'"
        ) from err
    return diffusers


class _RecordSelfAttention:
    """An attention processor that computes self-attention as diffusers' ``AttnProcessor`` does
    and keeps the probabilities [B, heads, T, T] in ``store[name]``."""

    def __init__(self, store: dict[str, Tensor], name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args: Any, **kwargs: Any) -> Tensor:  # fmt: skip
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name} is a cross-attention layer; CLIPer reads attn1 (self)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        batch = probs.shape[0] // attn.heads
        self.store[self.name] = probs.reshape(batch, attn.heads, *probs.shape[1:])
        return out / attn.rescale_output_factor


def normalise_maps(maps_MTT: Tensor, threshold: float) -> Tensor:
    """CLIPer's per-map normalisation: divide by the column max (+1e-5), zero values under
    ``threshold``, normalise rows (+1e-5)."""
    maps = maps_MTT / (maps_MTT.amax(dim=-2, keepdim=True) + 1e-5)
    maps = torch.where(maps < threshold, torch.zeros_like(maps), maps)
    return maps / (maps.sum(dim=-1, keepdim=True) + 1e-5)


def combine_maps(maps_MTT: Tensor, mode: str = "sfsa") -> Tensor:
    """One affinity [T, T]: ``sfsa`` = the product maps[0] @ maps[1] @ ..., ``mean`` = the mean."""
    if mode == "mean":
        return maps_MTT.mean(dim=0)
    if mode == "sfsa":
        eye = torch.eye(maps_MTT.shape[-1], dtype=maps_MTT.dtype, device=maps_MTT.device)
        return reduce(torch.matmul, maps_MTT, eye)
    raise ValueError(f"unknown affinity mode {mode!r} (sfsa or mean)")


def refine_maps(coarse_Qhw: Tensor, affinity_TT: Tensor) -> Tensor:
    """Coarse maps resized (bilinear) to the affinity's square grid, then A · maps: [Q, s, s]."""
    side = math.isqrt(affinity_TT.shape[0])
    cross_TQ = F.interpolate(coarse_Qhw[None].float(), size=(side, side), mode="bilinear")[0]
    cross_TQ = cross_TQ.flatten(-2).transpose(0, 1)
    return (affinity_TT.float() @ cross_TQ).transpose(0, 1).reshape(-1, side, side)


class SDAffinity:
    """Self-attention affinities of a Stable Diffusion UNet (see the module docstring).

    Give the diffusers ``unet``, ``vae`` and ``scheduler`` and the empty prompt's embedding
    ``prompt_embeds_1LD``, or load them with :meth:`from_folder`. Processors that record the
    maps are set on the ``layers`` of ``unet`` (the UNet is this object's to use).
    """

    def __init__(
        self,
        unet: Any,
        vae: Any,
        scheduler: Any,
        prompt_embeds_1LD: Tensor,
        layers: tuple[str, ...] = DEFAULT_LAYERS,
        time_step: int = 45,
        num_steps: int = 50,
        seed: int = 0,
    ) -> None:
        self.unet, self.vae, self.scheduler = unet.eval(), vae.eval(), scheduler
        self.prompt_embeds_1LD = prompt_embeds_1LD
        self.layers, self.time_step, self.num_steps, self.seed = layers, time_step, num_steps, seed
        self.maps: dict[str, Tensor] = {}
        modules = dict(unet.named_modules())
        for name in layers:
            if name not in modules or not hasattr(modules[name], "set_processor"):
                raise ValueError(f"the UNet has no attention layer {name}")
            modules[name].set_processor(_RecordSelfAttention(self.maps, name))

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype=torch.float32, **kw: Any
    ) -> SDAffinity:
        """Load ``unet``, ``vae``, ``scheduler`` and the empty-prompt embedding from a local
        diffusers folder (nothing is downloaded)."""
        folder = Path(folder)
        if not (folder / "unet").is_dir() or not (folder / "vae").is_dir():
            raise FileNotFoundError(f"{folder}: not a diffusers folder (needs unet/ and vae/)")
        d = _diffusers()
        load = {"local_files_only": True, "torch_dtype": dtype}
        unet = d.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **load)
        vae = d.AutoencoderKL.from_pretrained(folder, subfolder="vae", **load)
        sched_cfg = folder / "scheduler" / "scheduler_config.json"
        if not sched_cfg.is_file():
            raise FileNotFoundError(f"{folder}: no scheduler/scheduler_config.json")
        sched_cls = getattr(d, json.loads(sched_cfg.read_text()).get("_class_name", ""), None)
        if sched_cls is None:
            raise ValueError(f"{sched_cfg}: unknown diffusers scheduler class")
        scheduler = sched_cls.from_pretrained(folder, subfolder="scheduler")
        prompt = empty_prompt_embeds(folder).to(device, dtype)
        return cls(unet.to(device), vae.to(device), scheduler, prompt, **kw)

    @property
    def image_size(self) -> int:
        """Side of the square image the VAE encodes (sample size × VAE factor)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * factor

    @torch.no_grad()
    def attention_maps(self, image01_13HW: Tensor) -> Tensor:
        """The recorded self-attention maps of one image, heads of each layer in turn:
        [layers × heads, T, T] (float32)."""
        dtype = self.unet.dtype
        device = next(self.unet.parameters()).device
        size = self.image_size
        pixels = F.interpolate(image01_13HW.to(device, dtype), size=(size, size)) * 2 - 1
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        self.scheduler.set_timesteps(self.num_steps, device=device)
        t = self.scheduler.timesteps[self.time_step]
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(latents.shape, generator=gen).to(device, dtype)
        noisy = self.scheduler.add_noise(latents, noise, t[None] if t.dim() == 0 else t)
        self.maps.clear()
        self.unet(noisy, t, encoder_hidden_states=self.prompt_embeds_1LD.to(device, dtype))
        missing = [n for n in self.layers if n not in self.maps]
        if missing:
            raise RuntimeError(f"the UNet pass did not run {missing}")
        return torch.cat([self.maps[n][0].float() for n in self.layers])

    def affinity(self, image01_13HW: Tensor, threshold: float, mode: str = "sfsa") -> Tensor:
        """One [T, T] affinity of the image (normalised maps combined by ``mode``)."""
        return combine_maps(normalise_maps(self.attention_maps(image01_13HW), threshold), mode)

    def refine(self, image01_13HW: Tensor, coarse_Qhw: Tensor, settings: Any) -> Tensor:
        """CLIPer's refinement of coarse maps: [Q, s, s] on the UNet layer's token grid."""
        aff_TT = self.affinity(image01_13HW, settings.attention_thr, settings.refine)
        return refine_maps(coarse_Qhw, aff_TT.to(coarse_Qhw.device)).to(coarse_Qhw.dtype)


def empty_prompt_embeds(folder: Path) -> Tensor:
    """The empty prompt's text embedding [1, L, D]: ``empty_prompt_embeds.safetensors`` in the
    folder, else the folder's CLIP text encoder (needs transformers), as diffusers'
    ``encode_prompt`` gives it (padded to the tokenizer's max length, last hidden state)."""
    stored = folder / EMPTY_PROMPT_FILE
    if stored.is_file():
        from safetensors.torch import load_file

        return load_file(str(stored))["prompt_embeds"]
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise ImportError(
            f"{folder}: the empty-prompt embedding needs transformers (for text_encoder/) or a "
            f"{EMPTY_PROMPT_FILE} with key prompt_embeds"
        ) from err
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return encoder(ids)[0]
