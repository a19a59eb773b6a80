"""Models: T5 v1.1 / FLAN-T5 and Llama/Qwen2 decoders behind one API (api.py)."""

from gkd.models.api import Model
from gkd.models.decoder import DecoderConfig, DecoderModel
