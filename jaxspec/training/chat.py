"""Chat templates: a conversation rendered with a checkpoint's Jinja template, exactly as transformers renders it.

    text = render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                       special_tokens={"bos_token": "<s>", "eos_token": "</s>"})

The environment mirrors transformers' (``transformers/utils/chat_template_utils.py``): ``trim_blocks`` and
``lstrip_blocks``, loop controls, the ``{% generation %}`` tag (rendered as its body), ``raise_exception``,
``strftime_now``, a ``tojson`` filter that leaves non-ASCII and HTML characters alone, and ``dict`` /
``namespace`` that refuse underscore names. The template sees ``messages``, ``tools`` and ``documents``
(None), ``add_generation_prompt``, every named special token of the tokenizer (``bos_token``, ``eos_token``,
...) and any extra variables.

A template ships inside a checkpoint, so it is untrusted input: it runs in jinja2's immutable sandbox, an
attribute the sandbox deems unsafe (``''.__class__``...) is an error at once (transformers renders the first
such access as an empty string), and ``*`` / ``**`` cannot build values large enough to exhaust memory. Every
failure of a template is an InputError that says what went wrong.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxspec.errors import InputError

# Largest string or list a template may build with `*`, and largest integer exponent it may use with `**`.
MAX_REPEAT_LENGTH = 1_000_000
MAX_EXPONENT = 1_024

# Older names for a message's reasoning that transformers copies into the two fields templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering keeps the
    body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


def _repeat_length(left: Any, right: Any) -> int:
    """Length of `left * right` when it repeats a sequence, else 0."""
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            return len(seq) * max(count, 0)
    return 0


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing on unsafe attributes and on runaway `*` / `**`."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, op, left, right):
        if op == "*" and _repeat_length(left, right) > MAX_REPEAT_LENGTH:
            raise SecurityError(f"'*' would build a value longer than {MAX_REPEAT_LENGTH} items")
        if op == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"'**' with exponent {right} exceeds the limit {MAX_EXPONENT}")
        return operator.mul(left, right) if op == "*" else operator.pow(left, right)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace attribute may not start with an underscore, got {name!r}")


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's `namespace`, refusing underscore-prefixed attributes."""

    def __init__(*args, **kwargs):  # jinja2's signature trick: `namespace(self=...)` must still work
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The sandboxed, compiled template (cached per source text)."""
    if not isinstance(source, str):
        raise InputError(f"a chat template must be a string, got {type(source).__name__}")
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as err:
        raise InputError(f"chat template has a syntax error at line {err.lineno}: {err.message}") from err


def _plain_data(value: Any, where: str) -> Any:
    """`value` rebuilt from JSON types only, so the template never holds an object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, ...) carry methods of their own: keep only the plain value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(k, where): _plain_data(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_data(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(v, where) for v in value)
    raise InputError(f"{where}: chat data must be built from strings, numbers, booleans, None, lists and dicts; "
                     f"got a {type(value).__name__}")


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The conversation as transformers hands it to a template: plain dicts, keys holding None dropped, and
    a message's reasoning under both names templates read."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise InputError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                             f"{type(message).__name__}")
        kept = {k: v for k, v in message.items() if v is not None}
        out.append(_with_reasoning_aliases(_plain_data(kept, f"messages[{i}]")))
    return out


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str] | None = None, **variables) -> str:
    """`messages` rendered with `template`; `special_tokens` (name -> text, e.g. ``bos_token``) and `variables`
    become template variables (a variable of the same name wins over a special token)."""
    compiled = compile_template(template)
    chat = normalize_messages(messages)
    context = {**dict(special_tokens or {}), **_plain_data(variables, "template variables")}
    try:
        return compiled.render(messages=chat, tools=None, documents=None,
                               add_generation_prompt=bool(add_generation_prompt), **context)
    except SecurityError as err:
        raise InputError(f"chat template refused: {err} (templates run sandboxed, without access to Python "
                         "internals)") from err
    except TemplateError as err:
        raise InputError(f"chat template raised an error: {err}") from err
    except Exception as err:  # anything else a template does wrong (a str + int, a missing key...)
        raise InputError(f"chat template failed: {type(err).__name__}: {err}") from err


__all__ = ["MAX_EXPONENT", "MAX_REPEAT_LENGTH", "compile_template", "normalize_messages", "render_chat"]
