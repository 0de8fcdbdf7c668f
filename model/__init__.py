"""Llama/Qwen-family decoder, HF checkpoint and tokenizer loading, paged KV cache and engine."""
from .config import ModelConfig
from .model import Transformer
from .loading import from_pretrained, save_pretrained
from .tokenizer import Tokenizer, load_tokenizer
from .engine import Completion, Engine, EngineStats
from .sampling import SamplingParams
