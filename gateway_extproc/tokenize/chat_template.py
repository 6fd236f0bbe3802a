"""A model's chat template, rendered as Hugging Face `transformers` renders it.

`transformers` (and so vLLM, which calls its `apply_chat_template`) compiles the Jinja
template from `tokenizer_config.json` in an immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` block tag, replaces
the `tojson` filter with one that does not escape HTML, and offers `raise_exception` and
`strftime_now`. It renders with `messages`, `tools`, `documents`,
`add_generation_prompt`, the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
and the request's `chat_template_kwargs`. With `continue_final_message` it renders
without the generation prompt and cuts the text right after the last message's content.
All of that is reproduced here, so the text is the engine's, character for character.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template cannot render this conversation (or cannot be compiled)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers tracks assistant spans with
    it; rendering only needs its body."""

    tags = {"generation"}  # noqa: RUF012 - the type jinja2 declares

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from None
        self._special = dict(special_tokens or {})

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Any = None,
        documents: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be true"
            )
        context: dict[str, Any] = {**self._special, **(extra or {})}
        context.update(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
        )
        try:
            text = self._template.render(**context)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(str(exc) or type(exc).__name__) from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from None
        if continue_final_message and messages:
            text = _cut_after_final(text, messages[-1].get("content"))
        return text


def _cut_after_final(text: str, content: Any) -> str:
    if isinstance(content, list) and content and isinstance(content[-1], Mapping):
        content = content[-1].get("text")
    if not isinstance(content, str):
        raise ChatTemplateError("continue_final_message needs a final message with text")
    for needle in (content, content.strip()):
        at = text.rfind(needle)
        if needle and at >= 0:
            return text[: at + len(needle)]
    raise ChatTemplateError("the final message does not appear in the rendered chat")
