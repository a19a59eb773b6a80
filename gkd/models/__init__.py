"""Models: T5 v1.1 / FLAN-T5 and Llama/Qwen2 decoders behind one API (api.py)."""

from gkd.models.api import Model
from gkd.models.decoder import DecoderConfig, DecoderModel
from gkd.models.hf import load_hf, save_hf
from gkd.models.registry import (abstract_params, build_model, load_model_config,
                                 save_model_config)
from gkd.models.t5 import T5Config, T5Model
from gkd.models.checkpoint import load_model, save_model
