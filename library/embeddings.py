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
from typing import NamedTuple

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


class Flags(NamedTuple):
    """The option names an embedding's errors cite: textual inversion's, or train_network's --embedding_*."""
    token: str
    init_word: str
    count: str
    weights: str


TI_FLAGS = Flags("--token_string", "--init_word", "--num_vectors_per_token", "--weights")
NETWORK_FLAGS = Flags("--embedding_token_string", "--embedding_init_word", "--embedding_num_vectors",
                      "--embedding_weights")


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


def check_new_tokens(tokenizer, strings: list[str], label: str, flag: str = "--token_string") -> None:
    """UserError when a token string is already a word of the tokenizer (kohya asserts only on an exact
    vocabulary entry; a CLIP word is stored as `word</w>`, and a new token with its spelling would shadow
    that word in every caption and prompt)."""
    vocab = tokenizer.get_vocab()
    for text in strings:
        lowered = text.lower()  # CLIP lower-cases text before the vocabulary lookup
        if text in vocab or lowered in vocab or lowered + "</w>" in vocab:
            raise UserError(f"{flag} {strings[0]}: {text!r} is already in the vocabulary of {label}; "
                            f"pick a string the tokenizer does not know (e.g. {strings[0]}_ti)")


def init_token_ids(tokenizer, init_word: str, count: int, label: str, flags: Flags = TI_FLAGS) -> list[int]:
    """The ids whose vectors start the N new ones: --init_word's tokens, cycled to fill N."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"{flags.init_word} {init_word!r}: gives no tokens")
    if len(ids) > count:
        raise UserError(f"{flags.init_word} {init_word!r} is {len(ids)} tokens for {label} but {flags.count} "
                        f"is {count}: use at least {len(ids)} vectors, or a shorter init word")
    return [ids[i % len(ids)] for i in range(count)]


# --- embedding files ----------------------------------------------------------------------------------

def read_embedding_file(path: str, flag: str = "--weights") -> dict[str, torch.Tensor]:
    """An embedding file's vectors as {key: (N, D) float32}: A1111 `.pt` (`string_to_param`), kohya / A1111
    `.safetensors` (`emb_params`), SDXL (`clip_l`, `clip_g`) or diffusers (one key: the token)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            data = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise UserError(f"{flag} {path}: not a readable safetensors file ({exc})") from None
    else:
        try:  # tensors and plain containers only: nothing in the file can run code
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{flag} {path}: not a readable embedding file ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "string_to_param" in data:  # A1111's .pt
            data = dict(data["string_to_param"])
    if isinstance(data, torch.Tensor):
        data = {"emb_params": data}
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: not an embedding file (expected a dict of tensors)")
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"{flag} {path}: holds no tensors")
    return {key: (value.unsqueeze(0) if value.dim() == 1 else value).float() for key, value in tensors.items()}


def vectors_for_encoders(data: dict[str, torch.Tensor], dims: list[int], path: str,
                         flag: str = "--weights") -> list[torch.Tensor]:
    """The file's (N, D) vectors for each text encoder (widths `dims`), checked against them."""
    keys = file_keys(len(dims))
    if len(dims) == 1 and keys[0] not in data:
        if len(data) != 1:
            raise UserError(f"{flag} {path}: keys {sorted(data)}; expected emb_params (or one tensor) for a "
                            "model with one text encoder")
        data = {keys[0]: next(iter(data.values()))}
    missing = [key for key in keys if key not in data]
    if missing:
        raise UserError(f"{flag} {path}: no {', '.join(missing)} (keys: {', '.join(sorted(data))}); "
                        f"this model needs {', '.join(keys)}")
    vectors = [data[key] for key in keys]
    for key, value, dim in zip(keys, vectors, dims):
        if value.dim() != 2 or value.shape[1] != dim:
            raise UserError(f"{flag} {path}: {key} has shape {tuple(value.shape)}, this model's text encoder "
                            f"needs (N, {dim})")
    if len({v.shape[0] for v in vectors}) != 1:
        raise UserError(f"{flag} {path}: the encoders' vector counts differ "
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


def encoder_labels(count: int) -> list[str]:
    return [f"tokenizer {i + 1}" if count > 1 else "the tokenizer" for i in range(count)]


def load_start_vectors(path: str | None, dims: list[int], flags: Flags, token: str) -> list[torch.Tensor] | None:
    """The vectors of an embedding file (or of a LoRA file's bundled embedding for `token`) to start from."""
    if not path:
        return None
    data = read_embedding_file(path, flags.weights)
    if any(key.startswith(BUNDLE_PREFIX) for key in data):
        data = unbundle(data, token, path, flags.weights)
    vectors = vectors_for_encoders(data, dims, path, flags.weights)
    logger.info("starting from the %d vector(s) of %s", vectors[0].shape[0], path)
    return vectors


def vector_count(given: int | None, loaded: list[torch.Tensor] | None, flags: Flags, path: str | None) -> int:
    """The vector count asked for, or that of the loaded file (which it must match when both are given)."""
    if loaded is None:
        return given or 1
    found = loaded[0].shape[0]
    if given is not None and given != found:
        raise UserError(f"{flags.weights} {path} holds {found} vector(s) per token but {flags.count} is {given}: "
                        "leave it out to take the file's count")
    return found


class NewTokens:
    """`token` and its extra vectors added to every tokenizer of `family`, their trained vectors
    (`vectors`, a TrainedVectors) and the embedding layers routed to them."""

    def __init__(self, family, token: str, init_word: str | None, count: int | None, weights: str | None,
                 flags: Flags = TI_FLAGS):
        encoders, tokenizers = family.text_encoders, family.tokenizers
        labels = encoder_labels(len(tokenizers))
        loaded = load_start_vectors(weights, [te.get_input_embeddings().embedding_dim for te in encoders], flags,
                                    token)
        self.count = vector_count(count, loaded, flags, weights)
        self.strings = strings = token_strings(token, self.count)
        for tokenizer, label in zip(tokenizers, labels):  # every check before any tokenizer changes
            check_new_tokens(tokenizer, strings, label, flags.token)
        init_ids = [init_token_ids(tok, init_word, self.count, label, flags) if init_word else None
                    for tok, label in zip(tokenizers, labels)]
        start, self.rows = {}, []
        for i, (key, tokenizer, encoder) in enumerate(zip(file_keys(len(encoders)), tokenizers, encoders)):
            tokenizer.add_tokens(strings)
            ids = tokenizer.convert_tokens_to_ids(strings)
            if len(set(ids)) != self.count or tokenizer.unk_token_id in ids:
                raise UserError(f"{flags.token} {token}: {labels[i]} could not add {strings}")
            embedding = resize_for(encoder, ids)
            with torch.no_grad():
                if loaded is not None:
                    start[key] = loaded[i]
                elif init_ids[i] is not None:
                    start[key] = embedding.weight[init_ids[i]].float()
                else:  # kohya keeps what resizing gave the new rows
                    start[key] = embedding.weight[ids].float()
            self.rows.append((embedding, ids, key))
            logger.info("%s: tokens %s added as ids %s", labels[i], strings, ids)
        self.vectors = TrainedVectors(start)
        for embedding, ids, key in self.rows:
            route_new_ids(embedding, ids, self.vectors, key)
        self.sync()
        self.token_ids = [ids for _, ids, _ in self.rows]

    def sync(self) -> None:
        """Copy the trained vectors into the encoders' rows for the new ids (no other row is touched)."""
        for embedding, ids, key in self.rows:
            sync_rows(embedding, ids, getattr(self.vectors, key))

    def tensors(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The embedding file's tensors (`emb_params`, or SDXL's `clip_l` / `clip_g`) on the CPU."""
        return {key: value.detach().to("cpu", dtype or torch.float32)
                for key, value in self.vectors.state_dict().items()}


def wrap_family_text(family, captions: "CaptionRewriter") -> None:
    """Route the family's captions, sample prompts and token counts through `captions`, so the token string
    expands to all N tokens wherever text reaches the text encoders."""
    encode, prompt_embeds, count_tokens = family.encode_conditioning, family.prompt_embeds, family.count_tokens
    family.encode_conditioning = lambda texts: encode([captions.caption(t) for t in texts])
    family.prompt_embeds = lambda prompt, negative: prompt_embeds(captions.expand(prompt), captions.expand(negative))
    family.count_tokens = lambda text: count_tokens(captions.expand(text))


# --- embeddings bundled in a LoRA file --------------------------------------------------------------------
# A1111's lora-embedding bundle (stable-diffusion-webui PR #13568; Forge reads it too): `bundle_emb.NAME.KEY`,
# NAME the prompt word (split at the first dot, so it holds none) and KEY a key of the embedding file. One
# text encoder: `string_to_param.*` (A1111's .pt layout); SDXL: `clip_l` and `clip_g`.

BUNDLE_PREFIX = "bundle_emb."


def bundle_keys(token: str, num_encoders: int) -> list[str]:
    """The LoRA-file keys of `token`'s bundled embedding, in the family's encoder order."""
    names = ["string_to_param.*"] if num_encoders == 1 else file_keys(num_encoders)
    return [f"{BUNDLE_PREFIX}{token}.{name}" for name in names]


def bundle(tensors: dict[str, torch.Tensor], token: str) -> dict[str, torch.Tensor]:
    """An embedding file's tensors as bundled LoRA keys."""
    return dict(zip(bundle_keys(token, len(tensors)), tensors.values()))


def unbundle(data: dict[str, torch.Tensor], token: str, path: str, flag: str) -> dict[str, torch.Tensor]:
    """The embedding file's tensors of `token` from a LoRA file's bundled keys."""
    prefix = f"{BUNDLE_PREFIX}{token}."
    found = {key[len(prefix):]: value for key, value in data.items() if key.startswith(prefix)}
    if not found:
        names = sorted({key[len(BUNDLE_PREFIX):].split(".", 1)[0] for key in data if key.startswith(BUNDLE_PREFIX)})
        raise UserError(f"{flag} {path}: bundles no embedding {token!r} (it bundles: {', '.join(names)})")
    return {"emb_params" if key.startswith("string_to_param.") else key: value for key, value in found.items()}


# --- captions ---------------------------------------------------------------------------------------------

class CaptionRewriter:
    """Captions and prompts as the new tokens need them: the token string becomes all N token strings
    (kohya replaces every occurrence, even inside other words; here only where it stands as a word),
    and with a template option the caption is replaced by a random template (kohya's behaviour)."""

    def __init__(self, token: str, strings: list[str], templates: tuple[str, ...] | None, seed: int,
                 flag: str = "--token_string"):
        self.flag = flag
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
            logger.warning("caption %r does not contain %s %s: the embedding learns nothing from it "
                           "(use the token in the captions, or --use_object_template / --use_style_template)",
                           text[:60], self.flag, self.token)
        return self.expand(text)


# --- an embedding trained with a network (train_network.py --embedding_*) ------------------------------

NETWORK_EMBEDDING_OPTIONS = ("embedding_init_word", "embedding_num_vectors", "embedding_lr", "embedding_weights")


def check_network_options(cfg) -> None:
    """train_network's --embedding_* options, before anything is loaded."""
    token = cfg.embedding_token_string
    if token is None:
        given = [name for name in NETWORK_EMBEDDING_OPTIONS if getattr(cfg, name) is not None]
        if given:
            raise UserError(f"--{given[0]} needs --embedding_token_string (the new word to train)")
        return
    if not token.strip() or token != token.strip() or any(ch.isspace() or ch == "." for ch in token):
        # A1111 reads a bundled embedding's name up to the first dot (OneTrainer #485: a name with a space)
        raise UserError(f"--embedding_token_string {token!r}: must be one word without spaces or dots")
    if cfg.embedding_num_vectors is not None and cfg.embedding_num_vectors < 1:
        raise UserError(f"--embedding_num_vectors {cfg.embedding_num_vectors}: must be at least 1")
    if cfg.embedding_lr is not None and cfg.embedding_lr < 0:
        raise UserError(f"--embedding_lr {cfg.embedding_lr}: must not be negative")
    if cfg.embedding_weights and not os.path.isfile(cfg.embedding_weights):
        raise UserError(f"--embedding_weights {cfg.embedding_weights}: file not found")
    if cfg.cache_text_encoder_outputs:
        raise UserError("--embedding_token_string cannot run with --cache_text_encoder_outputs: the captions' "
                        "encoding changes as the embedding trains")
    if (cfg.save_model_as or "safetensors") != "safetensors":
        raise UserError(f"--embedding_token_string saves .safetensors files only (--save_model_as "
                        f"{cfg.save_model_as}): use --save_model_as safetensors")


def embedding_file_path(network_path: str) -> str:
    """The separate embedding file of a network save: `NAME.safetensors` -> `NAME_emb.safetensors`."""
    stem, extension = os.path.splitext(network_path)
    return f"{stem}_emb{extension}"


class NetworkEmbedding:
    """--embedding_token_string: a new word trained with the network. Its tokens join every tokenizer and its
    vectors train as one more optimizer group; captions and sample prompts expand the word."""

    def __init__(self, cfg, family):
        self.cfg = cfg
        self.tokens = NewTokens(family, cfg.embedding_token_string, cfg.embedding_init_word,
                                cfg.embedding_num_vectors, cfg.embedding_weights, NETWORK_FLAGS)
        cfg.embedding_num_vectors = self.tokens.count
        self.captions = CaptionRewriter(cfg.embedding_token_string, self.tokens.strings, None, cfg.seed or 0,
                                        NETWORK_FLAGS.token)
        wrap_family_text(family, self.captions)

    def param_group(self, default_lr: float | None) -> dict:
        lr = self.cfg.embedding_lr if self.cfg.embedding_lr is not None else default_lr
        return {"params": list(self.tokens.vectors.parameters()), "lr": lr}

    def save(self, network_path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """After the network file is written: the separate file and / or the bundled keys (--embedding_save)."""
        from safetensors import safe_open

        from library.saving import add_model_hashes, save_safetensors

        tensors = self.tokens.tensors(dtype)
        mode = self.cfg.embedding_save
        if mode in ("file", "both"):
            path = embedding_file_path(network_path)
            save_safetensors(tensors, path, add_model_hashes(tensors, metadata) if metadata is not None else None)
            logger.info("saved %s", path)
        if mode in ("bundle", "both"):
            with safe_open(network_path, "pt") as f:
                written = {key: f.get_tensor(key) for key in f.keys()}
                meta = f.metadata()
            written.update(bundle(tensors, self.cfg.embedding_token_string))
            save_safetensors(written, network_path, add_model_hashes(written, meta) if meta is not None else None)
