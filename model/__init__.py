"""Llama/Qwen-family decoder, HF checkpoint and tokenizer loading, and the rollout engine (engine/)."""

from .config import ModelConfig
from .engine import Completion, Engine, EngineStats, SamplingParams
from .loading import from_pretrained, save_pretrained
from .model import Transformer
from .tokenizer import Tokenizer, load_tokenizer
