"""The Stable Diffusion 1.x family: loading (diffusers folder or single file), text, images, prediction.

Text handling follows kohya sd-scripts so that trained files behave the same there:
- `--max_token_length` 150 / 225 tokenizes to 152 / 227 tokens, cut into chunks of 75 that each get
  their own BOS and EOS and run through CLIP separately; the hidden states are then stitched back
  into one sequence of 1 + max_token_length + 1 states.
- `--clip_skip N` takes the N-th hidden state from the end and applies CLIP's final layer norm.
"""

from __future__ import annotations

import logging
import os

import torch

from library.errors import UserError
from library.models import files
from library.prompt_weights import apply_token_weights, weighted_token_ids

logger = logging.getLogger(__name__)

CHUNK = 75  # caption tokens per CLIP pass (77 minus BOS and EOS)
MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def kohya_noise_scheduler():
    """The DDPM schedule kohya trains SD with (not the folder's own inference scheduler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, clip_sample=False,
    )


def chunk_input_ids(ids: torch.Tensor, eos: int, pad: int, max_token_length: int) -> torch.Tensor:
    """(B, max_token_length + 2) ids -> (B, 77 * k): k chunks of BOS + 75 ids + the last id (EOS/pad).

    With a pad token other than EOS (SD 2.x), a chunk cut inside the caption gets an EOS at its end and
    a chunk that is pure padding starts with EOS, as kohya does.
    """
    chunks = []
    for start in range(1, max_token_length + 1, CHUNK):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + CHUNK], ids[:, -1:]], dim=1)
        if pad != eos:
            cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[:, -1] = torch.where(cut, torch.full_like(chunk[:, -1], eos), chunk[:, -1])
            empty = chunk[:, 1] == pad
            chunk[:, 1] = torch.where(empty, torch.full_like(chunk[:, 1], eos), chunk[:, 1])
        chunks.append(chunk)
    return torch.cat(chunks, dim=1)


def tokenize_captions(tok, captions: list[str], max_token_length: int | None,
                      weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 77) ids, or (B, 77 * k) in chunks for --max_token_length; with `weighted`, A1111 attention
    syntax is parsed and (B, 77 or max_token_length + 2) weights of the merged states' positions are
    returned too (BOS, EOS and padding weigh 1), else None."""
    length = max_token_length or CHUNK
    weights = None
    if weighted:
        rows, weight_rows = [], []
        for caption in captions:
            ids, token_weights = weighted_token_ids(tok, caption, length)
            padding = length - len(ids)
            rows.append([tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * padding)
            weight_rows.append([1.0, *token_weights, 1.0] + [1.0] * padding)
        flat, weights = torch.tensor(rows, dtype=torch.long), torch.tensor(weight_rows)
    else:
        flat = tok(list(captions), padding="max_length", truncation=True, max_length=length + 2,
                   return_tensors="pt").input_ids
    if max_token_length is not None:
        flat = chunk_input_ids(flat, tok.eos_token_id, tok.pad_token_id, length)
    return flat, weights


def merge_chunk_states(states: torch.Tensor, max_token_length: int) -> torch.Tensor:
    """(B, 77 * k, D) per-chunk states -> (B, max_token_length + 2, D): first BOS, 75 per chunk, last EOS."""
    parts = [states[:, :1]]
    for start in range(1, max_token_length, CHUNK + 2):
        parts.append(states[:, start : start + CHUNK])
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


class SD1Family:
    """SD 1.x: one CLIP-L text encoder, a 4-channel VAE, epsilon prediction by default."""

    name = "sd1"
    resolution_default = 512
    pad_token = "<|endoftext|>"

    def __init__(self, unet, vae, text_encoder, tokenizer, *, model_path: str, vae_path: str | None = None,
                 v_prediction: bool = False, max_token_length: int | None = None, clip_skip: int | None = None,
                 weighted_captions: bool = False):
        layers = text_encoder.config.num_hidden_layers
        if clip_skip is not None and not 1 <= clip_skip <= layers:
            raise UserError(f"--clip_skip must be between 1 and {layers} for this text encoder, not {clip_skip}")
        self._set_parts(unet, vae, [text_encoder], [tokenizer], model_path, vae_path, v_prediction, max_token_length,
                        weighted_captions)
        self.clip_skip = clip_skip

    def _set_parts(self, unet, vae, text_encoders: list, tokenizers: list, model_path: str, vae_path: str | None,
                   v_prediction: bool, max_token_length: int | None, weighted_captions: bool) -> None:
        """What every family holds (SDXL's __init__ calls this too)."""
        if max_token_length not in MAX_TOKEN_LENGTHS:
            raise UserError(f"--max_token_length must be 75, 150 or 225, not {max_token_length}")
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.noise_scheduler = kohya_noise_scheduler()
        self.model_path, self.vae_path = model_path, vae_path
        self.v_prediction = v_prediction
        self.max_token_length = None if max_token_length == 75 else max_token_length
        self.weighted_captions = weighted_captions

    @property
    def bucket_divisor(self) -> int:
        """Image sides must divide by this: the VAE's factor 8 times the UNet's own downsampling."""
        return 8 * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # --- loading ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, cfg) -> "SD1Family":
        """Load the model named by cfg.pretrained_model_name_or_path (and cfg.vae when given)."""
        path = files.check_local_path(cfg.pretrained_model_name_or_path)
        unsafe = bool(getattr(cfg, "unsafe_load_ckpt", False))
        # Cheap checks first: a typo should not cost a multi-gigabyte load.
        if getattr(cfg, "max_token_length", None) not in MAX_TOKEN_LENGTHS:
            raise UserError(f"--max_token_length must be 75, 150 or 225, not {cfg.max_token_length}")
        vae_path = getattr(cfg, "vae", None)
        if vae_path:
            files.check_local_path(vae_path, "VAE")
        if os.path.isdir(path):
            unet, vae, text_encoder, tokenizer = cls.load_folder_components(path)
        else:
            unet, vae, text_encoder = cls._load_single_file(path, unsafe)
            tokenizer = None
        if tokenizer is None:
            from library.tokenizers import clip_tokenizer

            tokenizer = clip_tokenizer(cls.pad_token)
        if vae_path:
            vae = cls.load_vae(vae_path, unsafe)
        return cls(
            unet, vae, text_encoder, tokenizer, model_path=cfg.pretrained_model_name_or_path, vae_path=vae_path,
            v_prediction=bool(getattr(cfg, "v_parameterization", False)),
            max_token_length=getattr(cfg, "max_token_length", None), clip_skip=getattr(cfg, "clip_skip", None),
            weighted_captions=bool(getattr(cfg, "weighted_captions", False)),
        )

    @staticmethod
    def load_folder_components(path: str):
        """unet, vae, text encoder and (when the folder has one) tokenizer from a diffusers folder."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        def load(loader, subfolder):
            return files.load_subfolder(loader, path, subfolder)

        unet = load(UNet2DConditionModel, "unet")
        vae = load(AutoencoderKL, "vae")
        text_encoder = load(CLIPTextModel, "text_encoder")
        has_tokenizer = os.path.isdir(os.path.join(path, "tokenizer"))
        tokenizer = load(CLIPTokenizer, "tokenizer") if has_tokenizer else None
        return unet, vae, text_encoder, tokenizer

    @classmethod
    def _load_single_file(cls, path: str, unsafe: bool):
        """unet, vae, text encoder from an LDM-layout file, one component resident at a time."""
        from library.models import single_file

        parts = single_file.load_components(cls.name, path, unsafe)
        return parts["unet"], parts["vae"], parts["text_encoders"][0]

    @staticmethod
    def load_vae(path: str, unsafe: bool = False):
        """--vae: a diffusers VAE folder (or a model folder with vae/), or a single-file VAE."""
        from diffusers import AutoencoderKL

        files.check_local_path(path, "VAE")
        if os.path.isdir(path):
            for subfolder in ("", "vae"):
                if os.path.isfile(os.path.join(path, subfolder, "config.json")):
                    try:
                        return AutoencoderKL.from_pretrained(path, subfolder=subfolder or None, local_files_only=True)
                    except (OSError, ValueError) as exc:
                        raise UserError(f"{path}: cannot load the VAE ({str(exc).splitlines()[0]})") from None
            raise UserError(f"{path}: not a diffusers VAE folder (no config.json or vae/config.json)")
        from library.models import single_file

        return single_file.load_vae_file(path, "sd1", unsafe)

    # --- the family interface ------------------------------------------------------------------

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(B, 77) ids, or (B, 77 * k) for --max_token_length 150 / 225 (k chunks, see module doc)."""
        return tokenize_captions(self.tokenizers[0], captions, self.max_token_length)[0]

    def count_tokens(self, caption: str) -> int:
        """Tokens of a caption without BOS / EOS (what counts against --max_token_length)."""
        if self.weighted_captions:
            return len(weighted_token_ids(self.tokenizers[0], caption, 10**6)[0])
        return len(self.tokenizers[0](caption, add_special_tokens=False).input_ids)

    def tokenize_weighted(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`tokenize` for --weighted_captions: the same ids layout, and (B, 77 or max_token_length + 2)
        weights for the positions of the merged encoder states (BOS, EOS and padding weigh 1)."""
        return tokenize_captions(self.tokenizers[0], captions, self.max_token_length, weighted=True)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Captions -> conditioning: tokenize and encode, with --weighted_captions when it is on."""
        if not self.weighted_captions:
            return self.encode_text(self.tokenize(captions))
        ids, weights = self.tokenize_weighted(captions)
        return self.encode_text(ids, weights)

    def encode_text(self, input_ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 77 * k) ids -> (B, 77 or max_token_length + 2, D) conditioning, honouring --clip_skip;
        `weights` (B, same length) scale the states as --weighted_captions asks."""
        encoder = self.text_encoders[0]
        bare = getattr(encoder, "module", encoder)  # accelerate/DDP wrapping
        device = next(bare.parameters()).device
        batch = input_ids.shape[0]
        ids = input_ids.to(device).reshape(-1, CHUNK + 2)
        if self.clip_skip is None:
            states = encoder(ids)[0]
        else:
            out = encoder(ids, output_hidden_states=True, return_dict=True)
            final_norm = getattr(bare, "text_model", bare).final_layer_norm
            states = final_norm(out.hidden_states[-self.clip_skip])
        states = states.reshape(batch, -1, states.shape[-1])
        if self.max_token_length is not None:
            states = merge_chunk_states(states, self.max_token_length)
        if weights is not None:
            states = apply_token_weights(states, weights.to(states.device))
        return states

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> VAE latents (a sample of the posterior, as kohya) times the scaling factor."""
        param = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def encode_conditioning(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the text-encoder outputs the UNet needs, under kohya's npz key names (what
        --cache_text_encoder_outputs stores per sample)."""
        return {"hidden_state": self.encode_captions(captions)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond, batch: dict | None = None):
        """The UNet's output: noise (or v with --v_parameterization). `cond` is encode_conditioning's dict
        (or the hidden states themselves); SD 1.x / 2.x need nothing of the batch."""
        states = cond["hidden_state"] if isinstance(cond, dict) else cond
        if self.unet.config.in_channels == 9:  # inpainting: noisy | mask | masked-image latents
            extra = (batch or {}).get("inpaint_cond")
            if extra is None:
                raise UserError("this inpainting model (9 input channels) needs the batch's inpaint_cond "
                                "(library/inpainting.py add_conditioning)")
            noisy_latents = torch.cat([noisy_latents, extra.to(noisy_latents.device, noisy_latents.dtype)], dim=1)
        return self.unet(noisy_latents, timesteps, states.to(noisy_latents.device)).sample

    # --- sample images (library/sampling.py) -----------------------------------------------------

    def pipeline(self, scheduler):
        """A diffusers pipeline over this family's live modules (no copies of weights), so sample images
        show the network patched into them."""
        from library import inpainting

        if inpainting.is_inpainting(self):  # a 9-channel U-Net paints a blank, fully masked image
            return inpainting.sample_pipeline(self, scheduler)
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompt_embeds(self, prompt: str, negative_prompt: str) -> dict:
        """The pipeline's text arguments for a sample prompt: encoded like training captions (--clip_skip,
        --max_token_length), with A1111 weights as kohya's samples use."""
        ids, weights = self.tokenize_weighted([prompt, negative_prompt])
        states = self.encode_text(ids, weights)
        return {"prompt_embeds": states[:1], "negative_prompt_embeds": states[1:]}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (times the scaling factor) -> pixels in [-1, 1], computed in the VAE's own dtype."""
        param = next(self.vae.parameters())
        return self.vae.decode(latents.to(param.device, param.dtype) / self.vae.config.scaling_factor).sample

