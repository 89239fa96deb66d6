"""ademvl: ADEM-VL (adaptive and embedded fusion) for frozen Hugging Face LLMs."""

from .config import AdemVLConfig
from .data import AdemProcessor, Sample
from .model import AdemVLModel, CheckpointMismatch

__all__ = ["AdemVLConfig", "AdemVLModel", "AdemProcessor", "Sample", "CheckpointMismatch"]
__version__ = "0.1.0"
