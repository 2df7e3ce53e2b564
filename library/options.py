"""The option table: every kohya sd-scripts flag sdtune accepts, with its type, default and support status.

The table mirrors kohya-ss/sd-scripts v0.10 (train_network.py `setup_parser` and the `add_*_arguments`
functions it calls, read at commit 6edbe005): names, types, nargs, choices and defaults are kohya's, so
existing command lines and TOML files keep their meaning. The help texts are our own.

`supported` says what sdtune does with a value other than the default:
  True   -> honoured (or harmless: see the "inert" notes, options only read when a refused option is on);
  False  -> refused with "not supported yet: --name";
  tuple  -> only these values are honoured (strings compared case-insensitively).
`scripts` names the entry scripts that take the option: train_network, train_textual_inversion and fine_tune
(kohya's sdxl_* scripts are aliases of these).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

TRAIN_NETWORK = ("train_network",)


def int_or_float(text: str) -> int | float:
    """kohya's step-or-ratio type: "100" -> 100 steps, "0.1" -> ratio 0.1, "5%" -> ratio 0.05.

    A value of 1 or more must be a whole number of steps, as in kohya (where "1.5" is an error).
    """
    text = text.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    value = float(text)
    if value < 1:
        return value
    return int(text)


@dataclass(frozen=True)
class Option:
    """One command-line / TOML option."""

    name: str
    type: Callable[[str], Any]  # str, int, float, bool (store_true) or int_or_float
    default: Any
    help: str
    nargs: str | None = None
    choices: tuple | None = None
    action: str | None = None  # "store_true" for flags
    supported: bool | tuple = False
    scripts: tuple = TRAIN_NETWORK
    group: str = ""  # kohya's add_*_arguments function (or "sdtune" for our own)
    kohya: bool = True  # False for sdtune's own options, counted separately

    @property
    def is_flag(self) -> bool:
        return self.action == "store_true"


def _opt(name, type_, default, help, **kw) -> Option:
    return Option(name, type_, default, help, **kw)


def _flag(name, help, **kw) -> Option:
    return Option(name, bool, False, help, action="store_true", **kw)


def _group(group: str, rows: list[Option]) -> list[Option]:
    return [dataclasses.replace(row, group=group) for row in rows]


S = True  # shorthand for supported=True in the rows below

LOGGING = _group("logging", [
    _opt("console_log_level", str, None, "console log level",
         choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    _opt("console_log_file", str, None, "write the console log to this file instead of stderr"),
    _flag("console_log_simple", "plain console log lines, without rich formatting"),
])

SD_MODELS = _group("sd_models", [
    _flag("v2", "the base model is Stable Diffusion 2.x (accepted: the family is detected from the weights, "
          "and --v2 is checked against it)", supported=S),
    _flag("v_parameterization", "train with v-prediction targets", supported=S),
    _opt("pretrained_model_name_or_path", str, None,
         "base model: a .safetensors checkpoint or a diffusers folder", supported=S),
    _opt("tokenizer_cache_dir", str, None, "tokenizer cache folder (accepted; sdtune builds tokenizers offline)",
         supported=S),
])

MODEL_SPEC = _group("model_spec", [
    _opt("metadata_title", str, None, "modelspec title (default: the output name)", supported=S),
    _opt("metadata_author", str, None, "modelspec author", supported=S),
    _opt("metadata_description", str, None, "modelspec description", supported=S),
    _opt("metadata_license", str, None, "modelspec license", supported=S),
    _opt("metadata_tags", str, None, "modelspec tags, comma separated", supported=S),
    _opt("metadata_usage_hint", str, None, "modelspec usage hint", supported=S),
    _opt("metadata_thumbnail", str, None, "modelspec thumbnail: a data URL or an image file"),
    _opt("metadata_merged_from", str, None, "modelspec list of merged source models", supported=S),
    _opt("metadata_trigger_phrase", str, None, "modelspec trigger phrase", supported=S),
    _opt("metadata_preprocessor", str, None, "modelspec preprocessor", supported=S),
    _opt("metadata_is_negative_embedding", str, None, "modelspec flag: this is a negative embedding"),
])

DATASET = _group("dataset", [
    _opt("train_data_dir", str, None, "folder of N_concept image subfolders", supported=S),
    _flag("cache_info", "accepted: sdtune reads captions and image sizes afresh on every start (fast), so no "
          "metadata_cache.json is written or read", supported=S),
    _flag("shuffle_caption", "shuffle the separated parts of each caption", supported=S),
    _opt("caption_separator", str, ",", "separator of caption parts", supported=S),
    _opt("caption_extension", str, ".caption", "extension of caption files", supported=S),
    _opt("caption_extention", str, None, "old misspelt alias of --caption_extension", supported=S),
    _opt("keep_tokens", int, 0, "keep the first N caption parts in place when shuffling", supported=S),
    _opt("keep_tokens_separator", str, "", "separator ending the fixed part of a caption", supported=S),
    _opt("secondary_separator", str, None, "separator turned into caption_separator after shuffling", supported=S),
    _flag("enable_wildcard", "expand {a|b|c} wildcards in captions", supported=S),
    _opt("caption_prefix", str, None, "text put before every caption", supported=S),
    _opt("caption_suffix", str, None, "text put after every caption", supported=S),
    _flag("color_aug", "weak colour augmentation: a third of the samples get a small hue shift or gamma",
          supported=S),
    _flag("flip_aug", "mirror each sample with probability 0.5 (cached latents: both sides are cached)",
          supported=S),
    _opt("face_crop_aug_range", str, None,
         "e.g. 2.0,4.0: crop images named name_cx_cy_w_h around the face, 2 to 4 face sizes per short side",
         supported=S),
    _flag("random_crop", "random crop instead of centre crop", supported=S),
    _flag("debug_dataset", "list the first batches' samples and captions instead of training", supported=S),
    _opt("resolution", str, None, "training resolution: SIZE, WIDTH,HEIGHT, or square sizes to train "
         "at in turn (384,512,640 or multires:512,640)", supported=S),
    _flag("cache_latents", "encode every image once and keep the latents in memory", supported=S),
    _opt("vae_batch_size", int, 1, "batch size when caching latents", supported=S),
    _flag("cache_latents_to_disk", "cache latents in kohya's .npz files next to the images (implies --cache_latents)",
          supported=S),
    _flag("skip_cache_check", "trust existing cache files without checking their contents", supported=S),
    _flag("enable_bucket", "aspect-ratio buckets", supported=S),
    _opt("min_bucket_reso", int, 256, "smallest bucket side", supported=S),
    _opt("max_bucket_reso", int, 1024, "largest bucket side", supported=S),
    _opt("bucket_reso_steps", int, 64, "bucket side step", supported=S),
    _flag("bucket_no_upscale", "never upscale an image to fill a bucket", supported=S),
    _opt("resize_interpolation", str, None,
         "resize filter (default: area when shrinking, lanczos when enlarging)",
         choices=("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"), supported=S),
    _opt("token_warmup_min", int, 1, "start training with this many caption tags", supported=S),
    _opt("token_warmup_step", float, 0, "reach full caption length after N steps (N<1: ratio of the total)",
         supported=S),
    _flag("alpha_mask", "use the image alpha channel as a loss mask (transparent = ignored; see --masked_loss_*)",
          supported=S),
    _opt("dataset_class", str, None, "custom dataset class as package.module.Class"),
    _opt("caption_dropout_rate", float, 0.0, "probability of dropping a whole caption", supported=S),
    _opt("caption_dropout_every_n_epochs", int, 0, "drop every caption every N epochs", supported=S),
    _opt("caption_tag_dropout_rate", float, 0.0, "probability of dropping each caption tag", supported=S),
    _opt("reg_data_dir", str, None, "folder of regularization images", supported=S),
    _opt("in_json", str, None, "kohya's fine-tuning metadata JSON (captions / tags per image key); the images "
         "are under --train_data_dir", supported=S),
    _opt("dataset_repeats", int, 1, "repeats of an --in_json dataset (and of dataset-config subsets without "
         "num_repeats)", supported=S),
])

TRAINING = _group("training", [
    _opt("output_dir", str, None, "folder for the trained files", supported=S),
    _opt("output_name", str, None, "file name (without extension) of the trained files", supported=S),
    _opt("huggingface_repo_id", str, None, "Hugging Face repository to upload to"),
    # inert: the huggingface_* details are read only with --huggingface_repo_id, refused
    _opt("huggingface_repo_type", str, None, "Hugging Face repository type", supported=S),
    _opt("huggingface_path_in_repo", str, None, "path inside the Hugging Face repository", supported=S),
    _opt("huggingface_token", str, None, "Hugging Face token"),
    _opt("huggingface_repo_visibility", str, None, "public or private", supported=S),
    _flag("save_state_to_huggingface", "upload training state too"),
    _flag("resume_from_huggingface", "resume from a state stored on Hugging Face"),
    _flag("async_upload", "upload in the background"),
    _opt("save_precision", str, None, "dtype of saved weights", choices=(None, "float", "fp16", "bf16"), supported=S),
    _opt("save_every_n_epochs", int, None, "also save after every N epochs", supported=S),
    _opt("save_every_n_steps", int, None, "also save after every N steps", supported=S),
    _opt("save_n_epoch_ratio", int, None, "save at least N times over the run", supported=S),
    _opt("save_last_n_epochs", int, None, "keep only the last N epoch saves", supported=S),
    _opt("save_last_n_epochs_state", int, None, "keep only the last N epoch states", supported=S),
    _opt("save_last_n_steps", int, None, "keep step saves for the last N steps", supported=S),
    _opt("save_last_n_steps_state", int, None, "keep step states for the last N steps", supported=S),
    _flag("save_state", "save the training state (optimizer etc.) with each save", supported=S),
    _flag("save_state_on_train_end", "save the training state when training ends", supported=S),
    _opt("resume", str, None, "training state folder to resume from (continues exactly at its step)", supported=S),
    _opt("train_batch_size", int, 1, "images per batch", supported=S),
    _opt("max_token_length", int, None, "caption token limit (75 when unset)",
         choices=(None, 75, 150, 225), supported=S),  # 75 is not kohya's, but kohya_ss GUI files hold it
    _flag("mem_eff_attn", "kohya's memory-efficient attention"),
    _flag("torch_compile", "compile the U-Net with torch.compile", supported=S),
    # "no" is what kohya_ss GUI files hold: with --torch_compile it compiles nothing, as in kohya
    _opt("dynamo_backend", str, "inductor", "torch.compile backend",
         choices=("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                  "fx2trt", "onnxrt", "tensort", "ipex", "tvm", "no"), supported=S),
    _flag("xformers", "xformers attention (CUDA only)", supported=S),
    _flag("sdpa", "PyTorch scaled-dot-product attention", supported=S),
    _opt("vae", str, None, "VAE to use instead of the model's own", supported=S),
    _opt("max_train_steps", int, 1600, "number of optimizer steps", supported=S),
    _opt("max_train_epochs", int, None, "number of epochs (overrides --max_train_steps)", supported=S),
    _opt("max_data_loader_n_workers", int, 8, "data loader worker processes at most", supported=S),
    _flag("persistent_data_loader_workers", "keep data loader workers between epochs", supported=S),
    _opt("seed", int, None, "random seed", supported=S),
    _flag("gradient_checkpointing", "recompute activations in backward to save memory", supported=S),
    _opt("gradient_accumulation_steps", int, 1, "batches per optimizer step", supported=S),
    _opt("mixed_precision", str, "no", "autocast dtype", choices=("no", "fp16", "bf16"), supported=S),
    _flag("full_fp16", "train the network in fp16 including gradients (needs --mixed_precision fp16)", supported=S),
    _flag("full_bf16", "train the network in bf16 including gradients (needs --mixed_precision bf16)", supported=S),
    _flag("fp8_base", "store the base U-Net and text encoders in fp8, computed in the mixed-precision dtype",
          supported=S),
    _opt("ddp_timeout", int, None, "distributed timeout in minutes"),
    _flag("ddp_gradient_as_bucket_view", "DDP gradient_as_bucket_view"),
    _flag("ddp_static_graph", "DDP static_graph"),
    _opt("clip_skip", int, None, "use the output of the N-th last text encoder layer", supported=S),
    _opt("logging_dir", str, None, "write TensorBoard logs under this folder", supported=S),
    _opt("log_with", str, None, "logger", choices=("tensorboard", "wandb", "all"), supported=("tensorboard",)),
    _opt("log_prefix", str, None, "prefix of the log folder name", supported=S),
    _opt("log_tracker_name", str, None, "tracker (project) name of the logs", supported=S),
    # inert: read only with --log_with wandb, refused
    _opt("wandb_run_name", str, None, "wandb run name", supported=S),
    _opt("log_tracker_config", str, None, "tracker settings file"),
    _opt("wandb_api_key", str, None, "wandb API key"),
    _flag("log_config", "log the training options to the tracker"),
    _opt("noise_offset", float, None, "noise offset strength (about 0.1)", supported=S),
    _flag("noise_offset_random_strength", "random noise offset strength between 0 and --noise_offset",
          supported=S),
    _opt("multires_noise_iterations", int, None, "multi-resolution noise iterations (6 to 10)", supported=S),
    _opt("ip_noise_gamma", float, None, "input perturbation noise strength (about 0.1)", supported=S),
    _flag("ip_noise_gamma_random_strength", "random perturbation strength between 0 and --ip_noise_gamma",
          supported=S),
    _opt("multires_noise_discount", float, 0.3, "multi-resolution noise discount", supported=S),
    _opt("adaptive_noise_scale", float, None, "add mean |latent| times this to the noise offset", supported=S),
    _flag("zero_terminal_snr", "rescale the noise schedule to zero terminal SNR", supported=S),
    _opt("min_timestep", int, None, "smallest timestep sampled (0..999)", supported=S),
    _opt("max_timestep", int, None, "largest timestep sampled, exclusive (1..1000)", supported=S),
    _opt("loss_type", str, "l2", "loss function", choices=("l1", "l2", "huber", "smooth_l1"), supported=S),
    # read only with --loss_type huber / smooth_l1
    _opt("huber_schedule", str, "snr", "Huber parameter schedule", choices=("constant", "exponential", "snr"),
         supported=S),
    _opt("huber_c", float, 0.1, "Huber loss decay parameter", supported=S),
    _opt("huber_scale", float, 1.0, "Huber loss scale", supported=S),
    _flag("lowram", "low-RAM loading (move the base models to the GPU as soon as they load)", supported=S),
    _flag("highvram", "skip GPU cache clearing (sdtune never clears it: accepted, no effect)", supported=S),
    # sample images: library/sampling.py (epochs win over steps, as in kohya)
    _opt("sample_every_n_steps", int, None, "make sample images every N steps", supported=S),
    _flag("sample_at_first", "make sample images before training", supported=S),
    _opt("sample_every_n_epochs", int, None, "make sample images every N epochs", supported=S),
    _opt("sample_prompts", str, None, "prompt file for sample images (.txt with --n --w --h --s --l --d --ss, "
         ".toml or .json)", supported=S),
    _opt("sample_sampler", str, "ddim", "sampler for sample images",
         choices=("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                  "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"),
         supported=S),
    _opt("config_file", str, None, "read options from this TOML file (.toml may be left off)", supported=S),
    # kohya: a flag that writes to --config_file's path; sdtune also takes a PATH (see library/config.py)
    _opt("output_config", str, None, "write the resolved options to this TOML file and exit", supported=S),
    # weights only regularization images (--reg_data_dir, or is_reg subsets of --dataset_config)
    _opt("prior_loss_weight", float, 1.0, "loss weight of regularization images", supported=S),
])

MASKED_LOSS = _group("masked_loss", [
    _opt("conditioning_data_dir", str, None, "with --masked_loss: folder of mask images, one per training image "
         "with the same stem (red channel, 255 = learn); a sub-folder per <repeats>_<concept> folder, or flat",
         supported=S),
    _flag("masked_loss", "weight the loss by masks (white = learn, black = ignore; see --masked_loss_*): "
          "--conditioning_data_dir's, else the <stem>-masklabel.png next to each image, else with --alpha_mask "
          "the alpha channel", supported=S),
])

# inert: every deepspeed detail is read only with --deepspeed, refused
DEEPSPEED = _group("deepspeed", [
    _flag("deepspeed", "train with DeepSpeed"),
    _opt("zero_stage", int, 2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3), supported=S),
    _opt("offload_optimizer_device", str, None, "ZeRO optimizer offload device", choices=(None, "cpu", "nvme"),
         supported=S),
    _opt("offload_optimizer_nvme_path", str, None, "ZeRO optimizer offload NVMe path", supported=S),
    _opt("offload_param_device", str, None, "ZeRO parameter offload device", choices=(None, "cpu", "nvme"),
         supported=S),
    _opt("offload_param_nvme_path", str, None, "ZeRO parameter offload NVMe path", supported=S),
    _flag("zero3_init_flag", "build the model under deepspeed.zero.Init (ZeRO-3)", supported=S),
    _flag("zero3_save_16bit_model", "save a 16-bit model (ZeRO-3)", supported=S),
    _flag("fp16_master_weights_and_gradients", "fp16 master weights and gradients (ZeRO-2 offload)", supported=S),
])

OPTIMIZER = _group("optimizer", [
    _opt("optimizer_type", str, "", "optimizer name (AdamW, AdamW8bit, Lion, Prodigy, DAdaptAdam, Adafactor, "
         "AdamWScheduleFree, CAME, ... in any case) or module.Class (default AdamW)", supported=S),
    _flag("use_8bit_adam", "old spelling of --optimizer_type AdamW8bit", supported=S),
    _flag("use_lion_optimizer", "old spelling of --optimizer_type Lion", supported=S),
    _opt("learning_rate", float, 2.0e-6, "learning rate", supported=S),
    _opt("max_grad_norm", float, 1.0, "gradient clipping norm (0: no clipping)", supported=S),
    _opt("optimizer_args", str, None, "optimizer arguments as key=value", nargs="*", supported=S),
    _opt("lr_scheduler_type", str, "", "custom scheduler: a torch.optim.lr_scheduler name or module.Class",
         supported=S),
    _opt("lr_scheduler_args", str, None, "scheduler arguments as key=value", nargs="*", supported=S),
    _opt("lr_scheduler", str, "constant", "learning-rate schedule",
         supported=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "rex",
                    "adafactor")),
    _opt("lr_warmup_steps", int_or_float, 0, "warmup steps, or a ratio of the total below 1 (or N%)", supported=S),
    _opt("lr_decay_steps", int_or_float, 0, "decay steps of warmup_stable_decay, or a ratio of the total below 1 "
         "(or N%)", supported=S),
    _opt("lr_scheduler_num_cycles", int, 1, "cycles of cosine_with_restarts (and cosine_with_min_lr, "
         "warmup_stable_decay)", supported=S),
    _opt("lr_scheduler_power", float, 1, "power of the polynomial schedule", supported=S),
    # library.fused_backward refuses the optimizers and settings it cannot run exactly, with the reason
    _flag("fused_backward_pass", "update each parameter inside backward as soon as its gradient is ready, so "
          "gradients are never all held (per-tensor optimizers only: AdamW, Adafactor, Lion, SGD, 8-bit forms)",
          supported=S),
    _opt("lr_scheduler_timescale", int, None, "timescale of the inverse_sqrt schedule (default: the warmup, "
         "or 10000)", supported=S),
    _opt("lr_scheduler_min_lr_ratio", float, None, "final learning rate as a ratio of the peak (cosine_with_min_lr, "
         "warmup_stable_decay, rex)", supported=S),
])

CONFIG = _group("config", [
    _opt("dataset_config", str, None, "dataset TOML with [general] and [[datasets]] tables", supported=S),
])

CUSTOM_TRAIN = _group("custom_train", [
    _opt("min_snr_gamma", float, None, "min-SNR loss weighting gamma (5 is common)", supported=S),
    _flag("scale_v_pred_loss_like_noise_pred", "scale v-prediction loss like noise-prediction loss", supported=S),
    _opt("v_pred_like_loss", float, None, "add a v-prediction-like loss times this", supported=S),
    _flag("debiased_estimation_loss", "debiased estimation loss weighting", supported=S),
    _flag("weighted_captions", "read (word:1.2) attention weights in captions", supported=S),
])

NETWORK = _group("train_network", [
    _flag("cpu_offload_checkpointing", "offload checkpointed activations to the CPU"),
    _flag("no_metadata", "save without ss_* metadata", supported=S),
    _opt("save_model_as", str, "safetensors", "file format (ckpt and pt: a torch.save of the weights, no metadata)",
         choices=(None, "ckpt", "pt", "safetensors"), supported=S),
    _opt("unet_lr", float, None, "learning rate of the U-Net modules", supported=S),
    _opt("text_encoder_lr", float, None, "learning rate of the text encoder modules (one per encoder)",
         nargs="*", supported=S),
    _flag("fp8_base_unet", "store the base U-Net (only) in fp8", supported=S),
    _opt("network_weights", str, None, "start from these network weights", supported=S),
    _opt("network_module", str, None, "network module to train, e.g. networks.lora", supported=S),
    _opt("network_dim", int, None, "network rank", supported=S),
    _opt("network_alpha", float, 1, "network alpha (scale = alpha / rank)", supported=S),
    _opt("network_dropout", float, None, "dropout of network neurons (0..1)", supported=S),
    _opt("network_args", str, None, "network arguments as key=value", nargs="*", supported=S),
    _flag("network_train_unet_only", "train the U-Net modules only", supported=S),
    _flag("network_train_text_encoder_only", "train the text encoder modules only", supported=S),
    _opt("training_comment", str, None, "comment stored in the metadata", supported=S),
    _flag("dim_from_weights", "take each layer's rank and alpha from --network_weights", supported=S),
    _opt("scale_weight_norms", float, None, "max-norm regularization: after each step, scale down every "
         "network layer whose weight change has a norm above this (1 is common)", supported=S),
    _opt("base_weights", str, None, "network files merged into the model before training", nargs="*",
         supported=S),
    _opt("base_weights_multiplier", float, None, "multiplier of each --base_weights file (default 1)",
         nargs="*", supported=S),
    _flag("no_half_vae", "keep the VAE in float32 under mixed precision", supported=S),
    _flag("skip_until_initial_step", "skip batches until --initial_step", supported=S),
    _opt("initial_epoch", int, None, "number of the first epoch (1: the first)", supported=S),
    _opt("initial_step", int, None, "number of steps done before the first one (wins over --initial_epoch)",
         supported=S),
    # inert: the validation settings are read only with --validation_split, refused
    _opt("validation_seed", int, None, "seed for the validation split", supported=S),
    _opt("validation_split", float, 0.0, "share of the images kept for validation"),
    _opt("validate_every_n_steps", int, None, "validate every N steps", supported=S),
    _opt("validate_every_n_epochs", int, None, "validate every N epochs", supported=S),
    _opt("max_validation_steps", int, None, "validation batches at most", supported=S),
])

# kohya's sdxl_train_util.add_sdxl_training_arguments; sdtune takes them for every family
SDXL_TRAINING = _group("sdxl_training", [
    _flag("cache_text_encoder_outputs", "encode each caption once before training and keep the outputs, so the "
          "text encoders can leave the GPU (needs --network_train_unet_only and captions that never change)",
          supported=S),
    _flag("cache_text_encoder_outputs_to_disk", "keep them in kohya's <image>_te_outputs.npz beside each image, "
          "reused by the next run (turns on --cache_text_encoder_outputs)", supported=S),
])

SDTUNE = _group("sdtune", [
    Option("unsafe_load_ckpt", bool, False, "allow loading a pickled .ckpt (unpickling can run code)",
           action="store_true", supported=S, kohya=False),
    Option("skip_bad_images", bool, False, "leave out unreadable or truncated images, listed in one warning, "
           "instead of stopping before training", action="store_true", supported=S, kohya=False),
    # OneTrainer's masked-training knobs, for --masked_loss and --alpha_mask; 0, 0 and off give kohya's loss
    Option("masked_loss_unmasked_weight", float, 0.1, "loss weight outside the mask (the mask is raised to at "
           "least this; 0: masked-out areas teach nothing, as kohya)", supported=S, kohya=False),
    Option("masked_loss_unmasked_probability", float, 0.1, "share of samples trained without their mask "
           "(0: always masked, as kohya)", supported=S, kohya=False),
    Option("masked_loss_normalize", bool, False, "divide each sample's masked loss by its mask's mean weight, "
           "so small masked areas teach as much as large ones", action="store_true", supported=S, kohya=False),
    Option("text_encoder_train_epochs", int, None, "train the text encoder's network layers for this many "
           "epochs only, then freeze them (OneTrainer's stop-training-after; unset: every epoch)", supported=S,
           kohya=False),
    # EMA of the trained weights (library/ema.py)
    Option("ema", bool, False, "keep an exponential moving average (EMA) of the trained weights",
           action="store_true", supported=S, kohya=False),
    Option("ema_decay", float, 0.999, "EMA decay per update (warmed up: min(decay, (1 + n) / (10 + n)) after n "
           "updates)", supported=S, kohya=False),
    Option("ema_update_interval", int, 1, "update the EMA every N optimizer steps", supported=S, kohya=False),
    Option("ema_device", str, "device", "where the EMA is kept: the training device, or cpu to save its memory",
           choices=("device", "cpu"), supported=S, kohya=False),
    Option("ema_save", str, "both", "with --ema, save both (NAME = trained, NAME-ema = averaged), ema (the "
           "averaged weights as NAME) or raw", choices=("both", "ema", "raw"), supported=S, kohya=False),
    Option("ema_sample", str, "ema", "with --ema, sample images with the ema weights, the raw ones or both",
           choices=("ema", "raw", "both"), supported=S, kohya=False),
    # an embedding trained with the network (pivotal tuning; OneTrainer's additional embeddings)
    Option("embedding_token_string", str, None, "also train a new word's embedding with the network (pivotal "
           "tuning): it joins every tokenizer, captions and sample prompts use it", supported=S, kohya=False),
    Option("embedding_init_word", str, None, "word(s) whose token vectors start the embedding (default: "
           "random vectors)", supported=S, kohya=False),
    Option("embedding_num_vectors", int, None, "vectors of the embedding (default: 1, or the count of "
           "--embedding_weights)", supported=S, kohya=False),
    Option("embedding_lr", float, None, "learning rate of the embedding (default: the first --text_encoder_lr, "
           "else --learning_rate)", supported=S, kohya=False),
    Option("embedding_weights", str, None, "continue from an embedding file, or from the embedding bundled in a "
           "LoRA file", supported=S, kohya=False),
    Option("embedding_save", str, "file", "where the embedding is saved: file (NAME_emb.safetensors beside each "
           "network file), bundle (inside the network file, as A1111 / Forge read) or both",
           choices=("file", "bundle", "both"), supported=S, kohya=False),
])

# kohya's train_textual_inversion.py setup_parser: the shared add_*_arguments functions, except caption
# dropout (add_dataset_arguments(..., support_caption_dropout=False)) and --weighted_captions
# (add_custom_train_arguments(parser, False)); two of train_network's own rows; then its own rows below.
TEXTUAL_INVERSION = "train_textual_inversion"
TI_LEAVES_OUT = frozenset({"caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                           "weighted_captions"})
TI_TAKES = frozenset({"save_model_as", "no_half_vae", "unsafe_load_ckpt", "skip_bad_images",
                      "masked_loss_unmasked_weight", "masked_loss_unmasked_probability", "masked_loss_normalize"})

EMBEDDING = _group("train_textual_inversion", [
    _opt("token_string", str, None, "the new word to train (required; must not be a word the tokenizer knows); "
         "N vectors become the tokens TOKEN, TOKEN1 ... TOKEN{N-1}, and TOKEN in captions and sample prompts "
         "stands for all of them", supported=S, scripts=(TEXTUAL_INVERSION,)),
    _opt("init_word", str, None, "word(s) whose token vectors start the new ones, cycled to fill "
         "--num_vectors_per_token (default: random vectors)", supported=S, scripts=(TEXTUAL_INVERSION,)),
    _opt("num_vectors_per_token", int, None, "vectors per token (default: 1, or the count of --weights)",
         supported=S, scripts=(TEXTUAL_INVERSION,)),
    _opt("weights", str, None, "continue from this embedding file (A1111 / ComfyUI / kohya .safetensors or .pt; "
         "SDXL: clip_l and clip_g)", supported=S, scripts=(TEXTUAL_INVERSION,)),
    _flag("use_object_template", "train with kohya's object templates (\"a photo of a TOKEN\", ...) instead of "
          "the captions", supported=S, scripts=(TEXTUAL_INVERSION,)),
    _flag("use_style_template", "train with kohya's style templates (\"a painting in the style of TOKEN\", ...) "
          "instead of the captions", supported=S, scripts=(TEXTUAL_INVERSION,)),
])


def _with_textual_inversion(rows: list[Option], shared: bool) -> list[Option]:
    """Add train_textual_inversion to the rows it takes: every row of a shared group (`shared`) but those it
    leaves out, and the named rows of other groups."""
    return [dataclasses.replace(row, scripts=row.scripts + (TEXTUAL_INVERSION,))
            if (row.name in TI_TAKES or (shared and row.name not in TI_LEAVES_OUT)) else row for row in rows]


# kohya's fine_tune.py (and sdxl_train.py, which sdtune's fine_tune.py also stands for) calls the shared
# add_*_arguments with add_dataset_arguments(parser, False, True, True) and add_training_arguments(parser, False):
# no DreamBooth rows; add_sd_saving_arguments (--save_model_as with the checkpoint formats, --use_safetensors);
# then its own rows. sdxl_train.py adds --learning_rate_te1 / --learning_rate_te2 and --block_lr.
# library/full_model.py does what they say.
FINE_TUNE = "fine_tune"

# rows of the shared groups kohya's fine_tune.py does not have (its dataset and training arguments are
# added without DreamBooth support)
FT_LEAVES_OUT = frozenset({"reg_data_dir", "prior_loss_weight"})
# rows of train_network's own groups (and sdtune's) that fine_tune takes too
FT_TAKES = frozenset({
    "no_half_vae", "unsafe_load_ckpt", "skip_bad_images",
    "masked_loss_unmasked_weight", "masked_loss_unmasked_probability", "masked_loss_normalize",
    "ema", "ema_decay", "ema_update_interval", "ema_device", "ema_save", "ema_sample",
    "text_encoder_train_epochs", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
})

FINE_TUNE_ROWS = _group(FINE_TUNE, [
    _opt("save_model_as", str, None, "checkpoint format: safetensors (one file, A1111 / ComfyUI layout), ckpt, "
         "diffusers or diffusers_safetensors (a folder); unset: a single file for a single-file model, else a "
         "diffusers folder", choices=(None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"),
         supported=S, scripts=(FINE_TUNE,)),
    _flag("use_safetensors", "ckpt and diffusers formats save safetensors weights instead", supported=S,
          scripts=(FINE_TUNE,)),
    _flag("diffusers_xformers", "xformers attention through diffusers (sdtune: the same as --xformers)",
          supported=S, scripts=(FINE_TUNE,)),
    _flag("train_text_encoder", "train the text encoder(s) too", supported=S, scripts=(FINE_TUNE,)),
    _opt("learning_rate_te", float, None, "learning rate of the text encoder (default: --learning_rate; "
         "SDXL: the default of both encoders)", supported=S, scripts=(FINE_TUNE,)),
    _opt("learning_rate_te1", float, None, "SDXL: learning rate of text encoder 1 (CLIP-L; 0: frozen)",
         supported=S, scripts=(FINE_TUNE,)),
    _opt("learning_rate_te2", float, None, "SDXL: learning rate of text encoder 2 (bigG; 0: frozen)",
         supported=S, scripts=(FINE_TUNE,)),
    _opt("block_lr", str, None, "SDXL: 23 comma-separated learning rates, one per U-Net block (time/label "
         "embedding, 9 input, 3 middle, 9 output, out; 0: frozen)", supported=S, scripts=(FINE_TUNE,)),
])


def _with_fine_tune(rows: list[Option], shared: bool) -> list[Option]:
    """Add fine_tune to the rows it takes, as _with_textual_inversion does for its script."""
    return [dataclasses.replace(row, scripts=row.scripts + (FINE_TUNE,))
            if (row.name in FT_TAKES or (shared and row.name not in FT_LEAVES_OUT)) else row for row in rows]


OPTIONS: tuple[Option, ...] = tuple(
    _with_fine_tune(_with_textual_inversion(LOGGING + SD_MODELS + MODEL_SPEC + DATASET + TRAINING + MASKED_LOSS
                                            + DEEPSPEED + OPTIMIZER + CONFIG + CUSTOM_TRAIN, shared=True), shared=True)
    + _with_fine_tune(_with_textual_inversion(NETWORK + SDXL_TRAINING, shared=False), shared=False) + EMBEDDING
    + _with_fine_tune(_with_textual_inversion(SDTUNE, shared=False), shared=False) + FINE_TUNE_ROWS
)

SCRIPTS = ("train_network", TEXTUAL_INVERSION, FINE_TUNE)


def defaults_of_other_scripts(script: str) -> dict[str, Any]:
    """Every option `script` does not take, at its default: shared code (the loop, precision, metadata)
    reads options by name, and a script without an option runs as if it were left at its default."""
    return {opt.name: opt.default for opt in OPTIONS if script not in opt.scripts}


def options_for(script: str) -> dict[str, Option]:
    """The options of one entry script, by name, in table order."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; known: {', '.join(SCRIPTS)}")
    return {opt.name: opt for opt in OPTIONS if script in opt.scripts}


# Keys that GUI wrappers (bmaltais kohya_ss, Akegarasu lora-scripts) write into the TOML they pass to
# sd-scripts, and that sd-scripts ignores: sdtune ignores them too, with one warning.
GUI_KEYS = frozenset({
    "epoch", "noise_offset_type", "lowvram", "lr_restart_cycles",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
    "model_train_type", "additional_parameters", "LoRA_type", "sdxl", "flux1_checkbox", "sd3_checkbox",
})

# Options of other kohya scripts (sdxl_*, sd3_*, flux_*, fine_tune) that shared TOML files carry: ignored
# with the same warning, never mistaken for typos of a train_network option.
OTHER_SCRIPT_KEYS = frozenset({
    "text_encoder_batch_size",
    "disable_mmap_load_safetensors", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
    "blocks_to_swap", "single_blocks_to_swap", "double_blocks_to_swap", "ae", "clip_l", "clip_g", "t5xxl",
    "t5xxl_device", "t5xxl_dtype", "t5xxl_max_token_length", "apply_t5_attn_mask", "discrete_flow_shift",
    "model_prediction_type", "timestep_sampling", "guidance_scale", "split_mode", "mem_eff_save",
    "learning_rate_te1", "learning_rate_te2", "train_text_encoder", "stop_text_encoder_training",
    "save_clip", "save_t5xxl", "enable_scaled_pos_embed", "pos_emb_random_crop_rate",
    "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "use_safetensors",
})

IGNORED_KEYS = GUI_KEYS | OTHER_SCRIPT_KEYS
