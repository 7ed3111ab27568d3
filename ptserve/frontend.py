"""The HTTP side of a chat request, before the engine: validate, build the prompt, check the context.

Runs in the API server process, so a bad request is answered at once with a 400 and never reaches the
inference worker. Only the tokenizer and the model's config are loaded here, not the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ptserve.config import Config
from ptserve.engine import loader
from ptserve.engine.sampling import SamplingParams
from ptserve.prompting import encode_prompt, render_messages, resolve_max_tokens
from ptserve.protocol import ChatCompletionRequest, validate_request

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """What crosses to the inference worker: token ids and settings, nothing wire-shaped."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    ignore_eos: bool = False


@dataclass
class PreparedChat:
    request: ChatCompletionRequest
    job: Job


class Frontend:
    def __init__(self, config: Config, tokenizer, context_length: int):
        self.config = config
        self.tokenizer = tokenizer
        self.context_length = context_length

    @classmethod
    def load(cls, config: Config) -> Frontend:
        tokenizer = loader.load_tokenizer(config)
        return cls(config, tokenizer, loader.context_length(config, loader.load_model_config(config)))

    def prepare(self, body: Any) -> PreparedChat:
        request = validate_request(body)
        messages = render_messages(request.messages, self.config.system_prompt)
        prompt_ids = encode_prompt(self.tokenizer, messages)
        max_tokens = resolve_max_tokens(
            len(prompt_ids), request.requested_max_tokens(), self.config.generation.max_tokens, self.context_length
        )
        params = request.to_sampling_params(self.config.generation, max_tokens)
        return PreparedChat(request, Job(prompt_ids, params, request.stop_strings(), bool(request.ignore_eos)))
