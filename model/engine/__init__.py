"""The rollout engine and everything only it uses: paged KV cache, scheduler, decode step, sampler,
its own inference weights and its CPU shortcuts (oneDNN GEMMs, kept buffers)."""

from .engine import Completion, Engine, EngineStats
from .sampling import SamplingParams
