"""The HTTP side of a request, before the engine: validate, check the model name, build the prompt(s),
check the context and the prompt-token limit.

Runs in the API server process, so a bad request is answered at once with a 400 (or 404) and never
reaches the inference worker. Only the tokenizer and the model's config are loaded here, not the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from ptserve.config import Config
from ptserve.engine import loader
from ptserve.errors import APIError, invalid_request
from ptserve.job import Job
from ptserve.prompting import encode_prompt, render_messages, resolve_max_tokens
from ptserve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_token_ids,
    validate_completion_request,
    validate_request,
)
from ptserve.structured import build_grammar, check_grammar, tools_prompt

logger = logging.getLogger(__name__)

LEGACY_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Prepared:
    request: ChatCompletionRequest | CompletionRequest
    job: Job
    model: str  # the name the response carries
    prompt_texts: list[str] = field(default_factory=list)  # completions: for echo
    clock: Any = None  # the HTTP side's metrics.TokenClock

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.job.prompts)


class Frontend:
    def __init__(self, config: Config, tokenizer, context_length: int, vocab_size: int):
        self.config = config
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, config: Config) -> Frontend:
        tokenizer = loader.load_tokenizer(config)
        model_config = loader.load_model_config(config)
        vocab = getattr(model_config, "vocab_size", None) or len(tokenizer)
        return cls(config, tokenizer, loader.context_length(config, model_config), vocab)

    @property
    def model_names(self) -> list[str]:
        return [self.config.model.served_name, *self.config.model.aliases]

    def response_model(self, requested: str) -> str:
        """The name a response carries: the one asked for when it is ours, else the served name.
        Unknown names are served (clients send "gpt-4o-mini") unless model.strict_names is set."""
        if requested in self.model_names:
            return requested
        if self.config.model.strict_names:
            raise APIError(
                f"The model '{requested}' does not exist. This server serves: {', '.join(self.model_names)}.",
                404,
                param="model",
                code="model_not_found",
            )
        return self.config.model.served_name

    def _limit_prompt(self, count: int, param: str) -> None:
        limit = self.config.server.max_prompt_tokens
        if limit is not None and count > limit:
            raise invalid_request(
                f"The prompt has {count} tokens; this server accepts at most {limit} "
                f"(server.max_prompt_tokens). Please shorten it.",
                param=param,
                code="prompt_too_long",
            )

    def chat_prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt a chat request becomes: the configured system prompt unless it brings one, its tools'
        definitions, Phi-3.5's template and generation prompt."""
        messages = render_messages(request.messages, self.config.system_prompt, tools_prompt(request))
        return encode_prompt(self.tokenizer, messages)

    def prepare(self, body: Any) -> Prepared:
        """A chat completion request."""
        request = validate_request(body)
        model = self.response_model(request.model)
        check_token_ids(request.logit_bias, self.vocab_size)
        prompt_ids = self.chat_prompt_ids(request)
        self._limit_prompt(len(prompt_ids), "messages")
        max_tokens = resolve_max_tokens(
            len(prompt_ids), request.requested_max_tokens(), self.config.generation.max_tokens, self.context_length
        )
        params = request.to_sampling_params(self.config.generation, max_tokens)
        grammar = build_grammar(request)
        if grammar is not None:
            check_grammar(grammar, request)
            params = replace(params, grammar=grammar)
        job = Job([prompt_ids], params, request.stop_strings(), bool(request.ignore_eos), request.choices())
        return Prepared(request, job, model)

    def prepare_completion(self, body: Any) -> Prepared:
        """A legacy completion request: raw text (or token ids), no chat template, no system prompt."""
        request = validate_completion_request(body)
        model = self.response_model(request.model)
        check_token_ids(request.logit_bias, self.vocab_size)
        given = request.prompts()
        prompts, texts = [], []
        for i, prompt in enumerate(given):
            param = "prompt" if len(given) == 1 else f"prompt.[{i}]"
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt)["input_ids"]
                texts.append(prompt)
            else:
                bad = next((t for t in prompt if t >= self.vocab_size), None)
                if bad is not None:
                    raise invalid_request(
                        f"Invalid '{param}': token id {bad} is out of range; this model's vocabulary has "
                        f"{self.vocab_size} tokens.",
                        param=param,
                    )
                ids = list(prompt)
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
            if not ids:
                raise invalid_request(f"Invalid '{param}': it encodes to no tokens.", param=param)
            self._limit_prompt(len(ids), param)
            prompts.append(ids)
        # OpenAI's legacy default is 16 tokens; each prompt must fit the context with the budget.
        budgets = [
            resolve_max_tokens(
                len(ids), request.max_tokens, LEGACY_DEFAULT_MAX_TOKENS, self.context_length, param="prompt"
            )
            for ids in prompts
        ]
        params = request.to_sampling_params(self.config.generation, min(budgets))
        if request.echo and request.logprobs is not None:
            params = replace(params, prompt_logprobs=request.logprobs)
        job = Job(prompts, params, request.stop_strings(), bool(request.ignore_eos), request.choices())
        return Prepared(request, job, model, texts)
