"""The SDXL family: two text encoders, a pooled text embedding and size / crop conditioning.

Conditioning follows kohya sd-scripts (and diffusers' SDXL pipeline) so trained files behave the same:
- hidden_state1: CLIP-L's penultimate hidden state, hidden_state2: OpenCLIP bigG's penultimate hidden
  state, neither through the final layer norm; the UNet sees them side by side (768 + 1280 = 2048).
- pool2: bigG's projected pooled output (`text_embeds`), which the UNet adds to its time embedding
  together with the six size numbers (original h, w, crop top, left, target h, w).
- --max_token_length 150 / 225: both encoders run per 75-token chunk (as SD 1.x, see sd1.py) and the
  pooled output is the first chunk's.
- --clip_skip does not apply: SDXL is trained on the penultimate layer (kohya ignores it too).
"""

from __future__ import annotations

import logging
import os

import torch

from library.errors import UserError
from library.models import files
from library.models.files import folder_prediction_type
from library.models.sd1 import (
    CHUNK, MAX_TOKEN_LENGTHS, SD1Family, merge_chunk_states, tokenize_captions,
)
from library.prompt_weights import apply_token_weights

logger = logging.getLogger(__name__)

PAD_TOKENS = ("<|endoftext|>", "!")  # CLIP-L pads with EOS, OpenCLIP bigG with "!" (id 0)
SIZE_COND_WIDTH = 6  # original (h, w), crop (top, left), target (h, w)
VAE_SCALE = 0.13025


class SDXLFamily(SD1Family):
    """SDXL: CLIP-L + OpenCLIP bigG (with projection), a 4-channel VAE scaled by 0.13025, epsilon
    prediction by default. Images, latents, the VAE and token counting work as in SD 1.x."""

    name = "sdxl"
    resolution_default = 1024

    def __init__(self, unet, vae, text_encoders, tokenizers, *, model_path: str, vae_path: str | None = None,
                 v_prediction: bool = False, max_token_length: int | None = None, clip_skip: int | None = None,
                 weighted_captions: bool = False):
        if clip_skip is not None:
            logger.warning("--clip_skip %d is ignored for SDXL: it always uses the penultimate layer of both "
                           "text encoders (as kohya)", clip_skip)
        self._set_parts(unet, vae, text_encoders, tokenizers, model_path, vae_path, v_prediction, max_token_length,
                        weighted_captions)
        self.clip_skip = None

    # --- loading ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, cfg) -> "SDXLFamily":
        """Load the SDXL model named by cfg.pretrained_model_name_or_path (and cfg.vae when given)."""
        path = files.check_local_path(cfg.pretrained_model_name_or_path)
        unsafe = bool(getattr(cfg, "unsafe_load_ckpt", False))
        if getattr(cfg, "max_token_length", None) not in MAX_TOKEN_LENGTHS:  # before a multi-GB load
            raise UserError(f"--max_token_length must be 75, 150 or 225, not {cfg.max_token_length}")
        vae_path = getattr(cfg, "vae", None)
        if vae_path:
            files.check_local_path(vae_path, "VAE")
        v_prediction = bool(getattr(cfg, "v_parameterization", False))
        if os.path.isdir(path):
            parts = cls.load_folder_components(path)
            if not v_prediction and folder_prediction_type(path) == "v_prediction":
                logger.info("%s: the scheduler config says v_prediction: training with --v_parameterization", path)
                v_prediction = True
        else:
            from library.models import single_file

            parts = single_file.load_components("sdxl", path, unsafe)
        tokenizers = parts.get("tokenizers") or [None, None]
        tokenizers = [tok or _default_tokenizer(i) for i, tok in enumerate(tokenizers)]
        vae = cls.load_vae(vae_path, unsafe) if vae_path else parts["vae"]
        return cls(
            parts["unet"], vae, parts["text_encoders"], tokenizers, model_path=cfg.pretrained_model_name_or_path,
            vae_path=vae_path, v_prediction=v_prediction, max_token_length=getattr(cfg, "max_token_length", None),
            clip_skip=getattr(cfg, "clip_skip", None), weighted_captions=bool(getattr(cfg, "weighted_captions", False)),
        )

    @staticmethod
    def load_folder_components(path: str) -> dict:
        """{"unet", "vae", "text_encoders", "tokenizers"} from a diffusers SDXL folder (a tokenizer is None
        when the folder has no tokenizer/ or tokenizer_2/)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        def load(loader, subfolder):
            return files.load_subfolder(loader, path, subfolder)

        tokenizers = [load(CLIPTokenizer, sub) if os.path.isdir(os.path.join(path, sub)) else None
                      for sub in ("tokenizer", "tokenizer_2")]
        return {
            "unet": load(UNet2DConditionModel, "unet"),
            "vae": load(AutoencoderKL, "vae"),
            "text_encoders": [load(CLIPTextModel, "text_encoder"),
                              load(CLIPTextModelWithProjection, "text_encoder_2")],
            "tokenizers": tokenizers,
        }

    @staticmethod
    def load_vae(path: str, unsafe: bool = False):
        """--vae as SD 1.x reads it, with SDXL's latent scale: kohya always scales SDXL latents by
        0.13025, and a single-file VAE carries no config to say so."""
        vae = SD1Family.load_vae(path, unsafe)
        if vae.config.scaling_factor != VAE_SCALE:
            logger.info("%s: VAE scaling factor %s replaced by SDXL's %s", path, vae.config.scaling_factor, VAE_SCALE)
            vae.register_to_config(scaling_factor=VAE_SCALE)
        return vae

    # --- text -------------------------------------------------------------------------------------

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        """One (B, 77) id tensor per tokenizer, or (B, 77 * k) for --max_token_length (k chunks of 75)."""
        return [self._tokenize_with(tok, captions, weighted=False)[0] for tok in self.tokenizers]

    def tokenize_weighted(self, captions: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`tokenize` for A1111 weights ("(word:1.3)"): the ids per tokenizer, and (B, 77 or
        max_token_length + 2) weights of the merged states' positions (the same for both tokenizers:
        they share one vocabulary)."""
        pairs = [self._tokenize_with(tok, captions, weighted=True) for tok in self.tokenizers]
        return [ids for ids, _ in pairs], pairs[0][1]

    def _tokenize_with(self, tok, captions: list[str], weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return tokenize_captions(tok, captions, self.max_token_length, weighted)

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.encode_conditioning(captions)

    def encode_conditioning(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> {"hidden_state1": (B, L, 768), "hidden_state2": (B, L, 1280), "pool2": (B, 1280)}
        (kohya's npz keys; L = 77 or max_token_length + 2), with --weighted_captions when it is on."""
        if self.weighted_captions:
            ids, weights = self.tokenize_weighted(captions)
        else:
            ids, weights = self.tokenize(captions), None
        return self.encode_text(ids, weights)

    def encode_text(self, input_ids: list[torch.Tensor], weights: torch.Tensor | None = None) -> dict:
        """Both encoders' penultimate states (token weights applied to each) and bigG's pooled output."""
        h1, _ = self._encode_one(self.text_encoders[0], input_ids[0])
        h2, pool2 = self._encode_one(self.text_encoders[1], input_ids[1])
        if weights is not None:  # the pooled output stays unweighted, as in kohya
            h1 = apply_token_weights(h1, weights.to(h1.device))
            h2 = apply_token_weights(h2, weights.to(h2.device))
        return {"hidden_state1": h1, "hidden_state2": h2, "pool2": pool2}

    def _encode_one(self, encoder, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 77 * k) ids -> (penultimate states merged over the chunks, the first chunk's text_embeds or
        None for an encoder without projection)."""
        bare = getattr(encoder, "module", encoder)  # accelerate/DDP wrapping
        device = next(bare.parameters()).device
        batch = input_ids.shape[0]
        out = encoder(input_ids.to(device).reshape(-1, CHUNK + 2), output_hidden_states=True, return_dict=True)
        states = out.hidden_states[-2]
        states = states.reshape(batch, -1, states.shape[-1])
        if self.max_token_length is not None:
            states = merge_chunk_states(states, self.max_token_length)
        pooled = getattr(out, "text_embeds", None)
        if pooled is not None:
            pooled = pooled.reshape(batch, -1, pooled.shape[-1])[:, 0]  # the first chunk's (kohya)
        return states, pooled

    # --- the UNet ---------------------------------------------------------------------------------

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict | None = None):
        """The UNet's output (noise, or v with --v_parameterization) for encode_conditioning's `cond` and
        the batch's "size_cond" (B, 6); without one the image is taken as uncropped at the latents' size."""
        device, dtype = noisy_latents.device, noisy_latents.dtype
        states = torch.cat([cond["hidden_state1"], cond["hidden_state2"]], dim=-1).to(device, dtype)
        size_cond = (batch or {}).get("size_cond")
        if size_cond is None:
            size_cond = default_size_cond(noisy_latents)
        # time_ids stay float32: bf16 cannot hold sizes such as 1000 exactly
        added = {"text_embeds": cond["pool2"].to(device, dtype), "time_ids": size_cond.to(device, torch.float32)}
        return self.unet(noisy_latents, timesteps, states, added_cond_kwargs=added).sample

    # --- sample images (library/sampling.py) -----------------------------------------------------

    def pipeline(self, scheduler):
        """A diffusers StableDiffusionXLPipeline over this family's live modules (no copies: sample images
        show the network patched into them); no watermarker, nothing fetched."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=scheduler,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompt_embeds(self, prompt: str, negative_prompt: str) -> dict:
        """The pipeline's text arguments for a sample prompt, encoded like training captions (chunks,
        penultimate layers, first chunk's pooled output), with A1111 weights as kohya's samples use."""
        ids, weights = self.tokenize_weighted([prompt, negative_prompt])
        out = self.encode_text(ids, weights)
        states = torch.cat([out["hidden_state1"], out["hidden_state2"]], dim=-1)
        return {
            "prompt_embeds": states[:1], "negative_prompt_embeds": states[1:],
            "pooled_prompt_embeds": out["pool2"][:1], "negative_pooled_prompt_embeds": out["pool2"][1:],
        }


def default_size_cond(latents: torch.Tensor) -> torch.Tensor:
    """(B, 6) size conditioning of uncropped images at the latents' size: (h, w, 0, 0, h, w) in pixels."""
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return row.expand(latents.shape[0], SIZE_COND_WIDTH).clone()


def _default_tokenizer(index: int):
    from library.tokenizers import clip_tokenizer

    return clip_tokenizer(PAD_TOKENS[index])
