"""The one chat renderer: conversations -> text with a Jinja chat template, for training (the data step) and serving.

Training and `/v1/chat/completions` must build the same token ids for the same conversation, so both render here, and
both encode the rendered text without adding special tokens again (the template writes BOS where the model wants one;
`tokenizer(text)` would add a second). Rendering follows transformers' `apply_chat_template` (utils/chat_template_utils.py
in transformers 5): a sandboxed, immutable Jinja environment with trim_blocks and lstrip_blocks, the loop-controls
extension, its `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`, keys whose value is None dropped, and
`{% generation %}` blocks accepted. Only jinja2 is imported: the server runs without transformers or torch.

Assistant-only loss: many templates have no `{% generation %}` markers, so the learned spans come from rendering prefixes.
For an assistant turn i, the characters between render(messages[:i], add_generation_prompt=True) and
render(messages[:i + 1]) are what the model must produce (the content and the end-of-turn marker that follows it,
trailing whitespace left out: generation stops at the marker, so a line break after it is never produced); the
data step turns those character spans into token labels by offsets, so a token straddling a boundary is handled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
# The template variables transformers passes besides the messages are the tokenizer's special tokens; the server knows
# bos/eos (from tokenizer_config.json), and those are the ones chat templates read, so both sides pass exactly these.
TEMPLATE_TOKENS = ("bos_token", "eos_token")
# Marker tokens a template writes, the ChatML and Llama-3/Gemma kinds: <|im_start|>, <|eot_id|>, <start_of_turn>.
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|<(?:start|end)_of_turn>")

Span = tuple[int, int]


class ChatTemplateError(ValueError):
    """The template cannot render these messages (it raised, has a syntax error, or renders prefixes inconsistently)."""


def load_chat_template(folder: Path) -> str | None:
    """The template a tokenizer was saved with: chat_template.jinja (transformers 5) or tokenizer_config.json's."""
    path = Path(folder) / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def template_tokens(special: Mapping[str, Any]) -> dict[str, str]:
    """The special-token variables a template sees, from a tokenizer's special-token map (absent ones left out)."""
    return {name: str(special[name]) for name in TEMPLATE_TOKENS if special.get(name) is not None}


def render(template: str, messages: Iterable[Mapping[str, Any]], special: Mapping[str, Any],
           add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it, exactly as transformers' apply_chat_template(tokenize=False)."""
    from jinja2.exceptions import TemplateError

    plain = [{key: value for key, value in dict(message).items() if value is not None} for message in messages]
    try:
        return _compiled(template).render(messages=plain, add_generation_prompt=add_generation_prompt,
                                          **template_tokens(special))
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused these messages: {exc}") from None


def assistant_spans(template: str, messages: list[Mapping[str, Any]], special: Mapping[str, Any]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its assistant turns: the content and the end-of-turn
    marker after it (ChatML's <|im_end|>), without the whitespace the template writes before the next turn.

    Raises ChatTemplateError when a prefix renders differently from the start of the whole conversation (a template
    that rewrites earlier turns, e.g. one that drops past reasoning): then no prefix marks where a turn begins."""
    text = render(template, messages, special)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_prefix(template, messages[:i], special, text, add_generation_prompt=True))
        turn = _prefix(template, messages[: i + 1], special, text, add_generation_prompt=False)
        end = len(turn.rstrip())  # the line break after ChatML's <|im_end|> is the next turn's layout, never generated
        if end > start:
            spans.append((start, end))
    return text, spans


def _prefix(template: str, messages: list[Mapping[str, Any]], special: Mapping[str, Any], whole: str,
            add_generation_prompt: bool) -> str:
    rendered = render(template, messages, special, add_generation_prompt) if messages or add_generation_prompt else ""
    if not whole.startswith(rendered):
        raise ChatTemplateError(
            f"the chat template renders the first {len(messages)} message(s) differently from the start of the whole "
            "conversation, so the assistant turns cannot be found by rendering prefixes; use a template that renders "
            f"each turn independently of later ones (prefix {rendered[-80:]!r})"
        )
    return rendered


def learned(offsets: Iterable[tuple[int, int]], spans: list[Span]) -> list[bool]:
    """Per token: does it carry text of an assistant span? By character offsets, so a token merged across a boundary
    (byte-level BPE joins "\\n" and "Hi" into one) counts as learned when any of its characters is the assistant's.
    Tokens the tokenizer adds itself have empty (0, 0) offsets and are never learned."""
    return [any(start < span_end and end > span_start for span_start, span_end in spans) for start, end in offsets]


def markers(template: str) -> list[str]:
    """The marker tokens the template writes (<|im_start|>, <|im_end|> ...), in order of first appearance: a tokenizer
    trained for the template needs each as one special token, never split into pieces."""
    found: list[str] = []
    for marker in MARKER.findall(template):
        if marker not in found:
            found.append(marker)
    return found


def end_of_turn(template: str, special: Mapping[str, Any]) -> str | None:
    """The marker the template writes right after an assistant's content (ChatML: <|im_end|>): where generation stops."""
    sentinel = "\x00reply\x00"
    text = render(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], special)
    after = text[text.find(sentinel) + len(sentinel):] if sentinel in text else ""
    match = MARKER.match(after.lstrip(" "))
    return match.group(0) if match else None


def template_problem(template: str) -> str | None:
    """Why `template` cannot be used (not valid Jinja), or None: a recipe's template is checked at validate time."""
    try:
        _compiled(template)
    except ChatTemplateError as exc:
        return str(exc)
    return None


def check_messages(messages: Any) -> str | None:
    """Why `messages` is not a conversation the chat step and the server both take, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "a conversation is a non-empty list of {role, content} turns"
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"turn {index} is not a {{role, content}} mapping"
        if message.get("role") not in ROLES:
            return f"turn {index} has role {message.get('role')!r}; roles are {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"turn {index} has no text content"
    if not any(message["role"] == "assistant" for message in messages):
        return "it has no assistant turn, so there is nothing to learn"
    return None


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """The template compiled once (a data step renders thousands of prefixes with it)."""
    import jinja2
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it for its own mask; the
        prefix rendering here does not need it, but a template using it must still parse)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # transformers' own: Jinja's escapes HTML characters, which would change the rendered text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateNamespace(jinja2.utils.Namespace):
        """transformers' namespace: no underscore attributes (no way into CPython internals from a template)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, dict(*rest, **kwargs))

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc}") from None
