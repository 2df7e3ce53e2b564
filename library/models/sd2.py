"""The Stable Diffusion 2.x family: SD1's interface with an OpenCLIP-H text encoder, 512 epsilon or 768 v.

What differs from SD 1.x (library/models/sd1.py), and nothing else does:
- the text encoder is OpenCLIP-H stored as a 23-layer transformers CLIPTextModel: the checkpoints keep
  a 24th layer that SD 2.x never reads ("penultimate" conditioning), so the last kept layer plus the
  final layer norm is the conditioning, and --clip_skip N counts back from it as in kohya;
- the tokenizer pads with "!" (id 0), not with EOS (sd1.chunk_input_ids handles --max_token_length);
- a diffusers folder says whether it predicts v (scheduler/scheduler_config.json "prediction_type"),
  a single file cannot tell 512-epsilon from 768-v: see `resolve_v_prediction`;
- the default resolution is 768 for v-prediction models, 512 otherwise.
"""

from __future__ import annotations

import logging
import os

from library.models.files import folder_prediction_type
from library.models.sd1 import SD1Family

logger = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs", "sd2")
V_PREDICTION = "v_prediction"


def resolve_v_prediction(flag: bool, stated: str | None, path: str) -> bool:
    """Whether a SD 2.x model trains with v-prediction.

    `flag` is --v_parameterization, `stated` the folder's prediction_type (None when the model does not
    say). The flag always wins; a folder saying v_prediction switches it on by itself, because training
    a 768-v model on epsilon targets silently ruins it.
    """
    if stated == V_PREDICTION:
        if not flag:
            logger.info("%s: the scheduler config says prediction_type v_prediction: training with "
                        "v-prediction (as --v_parameterization)", path)
        return True
    if stated is not None:
        if flag:
            logger.warning("%s: the scheduler config says prediction_type %s, but --v_parameterization is "
                           "given: training with v-prediction", path, stated)
        return flag
    if not flag:
        logger.warning("%s: a SD 2.x file does not say whether it is a 512 epsilon or a 768 v-prediction "
                       "model: training as epsilon; pass --v_parameterization for 768-v models", path)
    return flag


class SD2Family(SD1Family):
    """SD 2.x: one OpenCLIP-H text encoder (23 layers), pad token "!", 512 epsilon or 768 v-prediction.

    Single files load through SD1Family's path (single_file.load_components with this family's name,
    which reads the OpenCLIP layout); everything else is SD 1.x's code.
    """

    name = "sd2"
    pad_token = "!"  # used when the folder brings no tokenizer (and always for single files)

    @classmethod
    def load(cls, cfg) -> "SD2Family":
        """Load as SD 1.x does, then settle v-prediction from the flag and the folder's scheduler config."""
        family = super().load(cfg)
        flag = bool(getattr(cfg, "v_parameterization", False))
        family.v_prediction = resolve_v_prediction(flag, folder_prediction_type(family.model_path),
                                                   family.model_path)
        family.resolution_default = 768 if family.v_prediction else 512
        return family
