"""graphcap: an LLM inference engine whose graph runtime (capture, compile, replay) is first class."""

from graphcap.engine.llm import LLM
from graphcap.engine.request import RequestOutput
from graphcap.engine.sampling_params import SamplingParams
from graphcap.errors import UserError

__all__ = ["LLM", "RequestOutput", "SamplingParams", "UserError"]
__version__ = "0.1.0"
