"""Textual-inversion embeddings: new tokens, their initial vectors, captions that use them, embedding files.

A trained embedding is N vectors per text encoder for the tokens `tok`, `tok1` ... `tok{N-1}` (kohya's
names). Files use the layout A1111, ComfyUI, kohya and diffusers' `load_textual_inversion` read:
one text encoder (SD 1.x / 2.x): `emb_params` (N, D); SDXL: `clip_l` (N, 768) and `clip_g` (N, 1280).

The trained vectors live in their own float32 parameters (`TrainedVectors`), one per text encoder.
The encoder's token embedding is resized so the tokenizer's new ids are valid, and its forward looks the
new ids up in the trained vectors instead of its own (frozen, possibly half-precision) rows. So no other
row can ever change, whatever the optimizer (weight decay included) does, and the trained rows keep full
precision under mixed precision. `sync_rows` copies the trained vectors into the resized rows after each
optimizer step, so the encoder's own weights always say what it computes.
"""

from __future__ import annotations

import logging
import os
import random
import re

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# kohya's --use_object_template / --use_style_template captions (from textual inversion's ImageNet
# templates); "{}" becomes the token and its extra vectors.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def token_strings(token: str, count: int) -> list[str]:
    """kohya's names of the N tokens: `tok`, `tok1`, ..., `tok{N-1}`."""
    return [token] + [f"{token}{i}" for i in range(1, count)]


def file_keys(num_encoders: int) -> list[str]:
    """The embedding file's key for each text encoder, in the family's encoder order."""
    return ["emb_params"] if num_encoders == 1 else ["clip_l", "clip_g"][:num_encoders]


def check_options(cfg) -> None:
    """The embedding options alone, before anything is loaded."""
    token = cfg.token_string
    if not token or not token.strip():
        raise UserError("--token_string is required: the new word to train, e.g. --token_string mychar")
    if token != token.strip() or any(ch.isspace() for ch in token):
        raise UserError(f"--token_string {token!r}: must be one word without spaces")
    if cfg.num_vectors_per_token is not None and cfg.num_vectors_per_token < 1:
        raise UserError(f"--num_vectors_per_token {cfg.num_vectors_per_token}: must be at least 1")
    if cfg.use_object_template and cfg.use_style_template:
        raise UserError("--use_object_template and --use_style_template exclude each other: keep one")
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise UserError(f"--weights {cfg.weights}: file not found")


def check_new_tokens(tokenizer, strings: list[str], label: str) -> None:
    """UserError when a token string is already a word of the tokenizer (kohya asserts only on an exact
    vocabulary entry; a CLIP word is stored as `word</w>`, and a new token with its spelling would shadow
    that word in every caption and prompt)."""
    vocab = tokenizer.get_vocab()
    for text in strings:
        lowered = text.lower()  # CLIP lower-cases text before the vocabulary lookup
        if text in vocab or lowered in vocab or lowered + "</w>" in vocab:
            raise UserError(f"--token_string {strings[0]}: {text!r} is already in the vocabulary of {label}; "
                            f"pick a string the tokenizer does not know (e.g. {strings[0]}_ti)")


def init_token_ids(tokenizer, init_word: str, count: int, label: str) -> list[int]:
    """The ids whose vectors start the N new ones: --init_word's tokens, cycled to fill N."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--init_word {init_word!r}: gives no tokens")
    if len(ids) > count:
        raise UserError(f"--init_word {init_word!r} is {len(ids)} tokens for {label} but --num_vectors_per_token "
                        f"is {count}: use at least {len(ids)} vectors, or a shorter init word")
    return [ids[i % len(ids)] for i in range(count)]


# --- embedding files ----------------------------------------------------------------------------------

def read_embedding_file(path: str) -> dict[str, torch.Tensor]:
    """An embedding file's vectors as {key: (N, D) float32}: A1111 `.pt` (`string_to_param`), kohya / A1111
    `.safetensors` (`emb_params`), SDXL (`clip_l`, `clip_g`) or diffusers (one key: the token)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            data = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise UserError(f"--weights {path}: not a readable safetensors file ({exc})") from None
    else:
        try:  # tensors and plain containers only: nothing in the file can run code
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"--weights {path}: not a readable embedding file ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "string_to_param" in data:  # A1111's .pt
            data = dict(data["string_to_param"])
    if isinstance(data, torch.Tensor):
        data = {"emb_params": data}
    if not isinstance(data, dict):
        raise UserError(f"--weights {path}: not an embedding file (expected a dict of tensors)")
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"--weights {path}: holds no tensors")
    return {key: (value.unsqueeze(0) if value.dim() == 1 else value).float() for key, value in tensors.items()}


def vectors_for_encoders(data: dict[str, torch.Tensor], dims: list[int], path: str) -> list[torch.Tensor]:
    """The file's (N, D) vectors for each text encoder (widths `dims`), checked against them."""
    keys = file_keys(len(dims))
    if len(dims) == 1 and keys[0] not in data:
        if len(data) != 1:
            raise UserError(f"--weights {path}: keys {sorted(data)}; expected emb_params (or one tensor) for a "
                            "model with one text encoder")
        data = {keys[0]: next(iter(data.values()))}
    missing = [key for key in keys if key not in data]
    if missing:
        raise UserError(f"--weights {path}: no {', '.join(missing)} (keys: {', '.join(sorted(data))}); "
                        f"this model needs {', '.join(keys)}")
    vectors = [data[key] for key in keys]
    for key, value, dim in zip(keys, vectors, dims):
        if value.dim() != 2 or value.shape[1] != dim:
            raise UserError(f"--weights {path}: {key} has shape {tuple(value.shape)}, this model's text encoder "
                            f"needs (N, {dim})")
    if len({v.shape[0] for v in vectors}) != 1:
        raise UserError(f"--weights {path}: the encoders' vector counts differ "
                        f"({', '.join(f'{k} {v.shape[0]}' for k, v in zip(keys, vectors))})")
    return vectors


# --- the trained vectors --------------------------------------------------------------------------------

class TrainedVectors(torch.nn.Module):
    """The N trained vectors of each text encoder, as float32 parameters named after the file's keys, so
    `state_dict()` is exactly an embedding file (what kohya's `.pt` saves hold)."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in vectors.items():
            self.register_parameter(key, torch.nn.Parameter(value.detach().clone().float()))

    def vectors(self) -> list[torch.Tensor]:
        return [param for _, param in self.named_parameters()]


def resize_for(encoder, token_ids: list[int]) -> torch.nn.Embedding:
    """Give the encoder's token embedding rows for every new id; returns the (new) embedding layer."""
    embedding = encoder.get_input_embeddings()
    rows = max(max(token_ids) + 1, embedding.num_embeddings)
    if rows > embedding.num_embeddings:
        # the new rows are overwritten by the trained vectors: no need for transformers' mean initialisation
        encoder.resize_token_embeddings(rows, mean_resizing=False)
        embedding = encoder.get_input_embeddings()
    return embedding


def route_new_ids(embedding: torch.nn.Embedding, token_ids: list[int], vectors: TrainedVectors, key: str) -> None:
    """Make the embedding layer look the new ids up in `vectors.<key>` (cast to the layer's dtype, so the
    rest of the encoder runs as before) and every other id in its own frozen rows."""
    slot_of = torch.full((embedding.num_embeddings,), -1, dtype=torch.long)
    slot_of[torch.tensor(token_ids)] = torch.arange(len(token_ids))
    plain_forward = embedding.forward

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        base = plain_forward(input_ids)
        slots = slot_of.to(input_ids.device)[input_ids]
        trained = getattr(vectors, key)
        picked = trained.to(base.dtype)[slots.clamp(min=0)]
        return torch.where((slots >= 0).unsqueeze(-1), picked, base)

    embedding.forward = forward


@torch.no_grad()
def sync_rows(embedding: torch.nn.Embedding, token_ids: list[int], vector: torch.Tensor) -> None:
    """Write the trained vectors into the encoder's own rows for the new ids."""
    weight = embedding.weight
    weight[torch.tensor(token_ids, device=weight.device)] = vector.detach().to(weight.device, weight.dtype)


# --- captions ---------------------------------------------------------------------------------------------

class CaptionRewriter:
    """Captions and prompts as the new tokens need them: the token string becomes all N token strings
    (kohya replaces every occurrence, even inside other words; here only where it stands as a word),
    and with a template option the caption is replaced by a random template (kohya's behaviour)."""

    def __init__(self, token: str, strings: list[str], templates: tuple[str, ...] | None, seed: int):
        self.expanded = " ".join(strings)
        self._pattern = re.compile(r"(?<![\w])" + re.escape(token) + r"(?![\w])")
        self.token = token
        self.templates = templates
        self._rng = random.Random(seed)
        self._warned = False

    def expand(self, text: str) -> str:
        return self._pattern.sub(lambda _: self.expanded, text) if self.expanded != self.token else text

    def caption(self, text: str) -> str:
        if self.templates:
            return self._rng.choice(self.templates).format(self.expanded)
        if not self._warned and not self._pattern.search(text):
            self._warned = True
            logger.warning("caption %r does not contain --token_string %s: the embedding learns nothing from it "
                           "(use the token in the captions, or --use_object_template / --use_style_template)",
                           text[:60], self.token)
        return self.expand(text)
