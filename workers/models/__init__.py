"""Model definitions (one decoder for Qwen3/Qwen2/Llama) and the HF folder loader."""

from zipserve.workers.models.decoder import ARCHITECTURES, DecoderModel, ModelArgs
from zipserve.workers.models.loader import load_model, read_model_args

__all__ = ["ARCHITECTURES", "DecoderModel", "ModelArgs", "load_model", "read_model_args"]
