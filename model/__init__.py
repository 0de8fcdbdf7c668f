"""Llama/Qwen-family decoder, HF checkpoint and tokenizer loading, paged KV cache and engine."""

from .config import ModelConfig
from .engine import Completion, Engine, EngineStats
from .loading import from_pretrained, save_pretrained
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer
