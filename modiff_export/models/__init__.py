"""Step 1 of the pipeline: the model. Loading diffusers UNets (the embedded `digits` model or a local
folder), the digits data and the training of the shipped weights."""
from .loading import ASSETS, DEFAULT_SEQ_LEN, EMBEDDED, LoadedModel, ModelError, content_hash, load_model

__all__ = ["ASSETS", "DEFAULT_SEQ_LEN", "EMBEDDED", "LoadedModel", "ModelError", "content_hash", "load_model"]
