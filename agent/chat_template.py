"""The checkpoint's own chat template, rendered with jinja2 the way Hugging Face transformers renders it.

transformers (utils/chat_template_utils.py, `_compile_jinja_template` / `render_jinja_template`) compiles a
template in an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension
and a `{% generation %}` tag, a `tojson` filter without HTML escaping, and the globals `raise_exception` and
`strftime_now`; it renders with `messages`, `tools`, `documents`, `add_generation_prompt` and the special
tokens of tokenizer_config.json (`bos_token`, `eos_token`, ...), request kwargs overriding those. Where the
template comes from follows tokenization_utils_base.py: a `chat_template.jinja` file in the folder wins over
tokenizer_config.json's `chat_template`, which is a string or a list of {name, template} (then "default",
or "tool_use" when tools are given). A folder with neither gets ChatML, the format MiniCPM4 was tuned on.

Reasoning: a template that knows `<think>...</think>` (or a vocabulary with both as added tokens) marks
the model's reasoning that way; `split_reasoning` separates it from the reply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from agent.errors import AgentInputError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TEMPLATE_FILE = "chat_template.jinja"
# The chat_template of the released MiniCPM4 checkpoints (tokenizer_config.json of MiniCPM4-8B/0.5B): ChatML.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# transformers' SPECIAL_TOKENS_ATTRIBUTES: what special_tokens_map puts in the template's scope when set.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                      "additional_special_tokens")
# Names the agent sets itself; a request's chat_template_kwargs may not replace them.
RESERVED_KWARGS = ("messages", "tools", "documents", "add_generation_prompt")
MAX_KWARGS = 32           # keys in chat_template_kwargs
MAX_KWARGS_BYTES = 4096   # chat_template_kwargs as compact JSON
MAX_TOOLS = 64


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@dataclass
class ChatTemplate:
    """A compiled template and what the agent needs to know about it."""
    text: str
    source: str                     # "checkpoint" (the folder's own) or "chatml" (the fallback)
    origin: str                     # the file (and key) it came from, for messages
    special_tokens: dict = field(default_factory=dict)
    reasoning: bool = False         # the model marks reasoning with <think>...</think>
    tool_template: Optional["ChatTemplate"] = None  # a list's "tool_use" entry, used when tools are given

    def __post_init__(self):
        import jinja2
        from jinja2 import meta

        env = _environment()
        try:
            self._template = env.from_string(self.text)
            self.variables = frozenset(meta.find_undeclared_variables(env.parse(self.text)))
        except jinja2.TemplateSyntaxError as e:
            raise AgentInputError(f"{self.origin}: the chat template does not compile "
                                  f"(line {e.lineno}: {e.message}); fix or remove it") from None

    def render(self, messages: list, add_generation_prompt: bool = True, tools: Optional[list] = None,
               **kwargs) -> str:
        """The prompt text; a failure inside the template is an AgentInputError naming it (a bad request)."""
        if tools is not None and self.tool_template is not None:
            return self.tool_template.render(messages, add_generation_prompt, tools, **kwargs)
        if tools is not None and "tools" not in self.variables:
            raise AgentInputError(f"tools: the chat template ({self.origin}) does not use tools")
        scope = {**self.special_tokens, **kwargs}  # request kwargs overwrite special tokens, as in transformers
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **scope)
        except Exception as e:  # the template is the checkpoint's code: whatever it raises refuses this request
            raise AgentInputError(f"chat template ({self.origin}): {type(e).__name__}: {str(e)[:200]}") from None


def _special_tokens(tok_cfg: dict) -> dict:
    """transformers' special_tokens_map: set tokens only, AddedToken objects ({"content": ...}) as text."""
    def text(v):
        return v.get("content") if isinstance(v, dict) else v

    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = tok_cfg.get(key)
        value = [text(v) for v in value] if isinstance(value, list) else text(value)
        if value:
            out[key] = value
    return out


def load_chat_template(model_dir: Path, tok_cfg: dict, added_tokens: frozenset = frozenset()) -> ChatTemplate:
    """The folder's template (chat_template.jinja, else tokenizer_config.json's), or ChatML when it has none."""
    special = _special_tokens(tok_cfg)
    think_tokens = THINK_OPEN in added_tokens and THINK_CLOSE in added_tokens

    def make(text, origin, source="checkpoint"):
        if not isinstance(text, str):
            raise AgentInputError(f"{origin}: the chat template must be a string")
        return ChatTemplate(text, source, origin, special, think_tokens or THINK_CLOSE in text)

    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        try:
            return make(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise AgentInputError(f"{path}: cannot read ({e})") from None
    origin = f"{model_dir / 'tokenizer_config.json'} key 'chat_template'"
    value = tok_cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if len(named) != len(value) or "default" not in named:
            raise AgentInputError(f"{origin}: a list of templates needs {{name, template}} objects, one named "
                                  f"'default' (names: {sorted(map(str, named))})")
        template = make(named["default"], f"{origin} 'default'")
        if "tool_use" in named:
            template.tool_template = make(named["tool_use"], f"{origin} 'tool_use'")
        return template
    if value is not None:
        return make(value, origin)
    return ChatTemplate(CHATML, "chatml", "ChatML (the folder has no chat template)", special, think_tokens)


def split_reasoning(text: str) -> tuple[Optional[str], str]:
    """(reasoning, reply) of a reasoning model's output; (None, text) when it holds no reasoning.

    The reasoning is what stands before the first </think> (its <think> optional: some templates open the
    block in the prompt); the reply follows, without the newlines after the tag. An output that opened
    <think> and stopped before closing it (max_tokens) is all reasoning.
    """
    start = text.lstrip()
    end = text.find(THINK_CLOSE)
    if end < 0:
        if start.startswith(THINK_OPEN):
            return start[len(THINK_OPEN):].strip("\n"), ""
        return None, text
    reasoning = text[:end].lstrip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):]
    return reasoning.strip("\n"), text[end + len(THINK_CLOSE):].lstrip("\n")


# --- request fields (the MQTT protocol and the HTTP API check them the same way) -------------------
def check_template_kwargs(value: Any) -> dict:
    """A request's chat_template_kwargs: an object of at most MAX_KWARGS string keys, compact JSON under
    MAX_KWARGS_BYTES, none of the names the agent sets itself."""
    if not isinstance(value, dict):
        raise AgentInputError("chat_template_kwargs: must be an object, e.g. {\"enable_thinking\": false}")
    if len(value) > MAX_KWARGS:
        raise AgentInputError(f"chat_template_kwargs: {len(value)} keys, at most {MAX_KWARGS}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise AgentInputError("chat_template_kwargs: keys must be non-empty strings")
        if key in RESERVED_KWARGS:
            raise AgentInputError(f"chat_template_kwargs: '{key}' is set by the agent "
                                  f"(reserved: {', '.join(RESERVED_KWARGS)})")
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        raise AgentInputError("chat_template_kwargs: values must be JSON (no NaN or infinity)") from None
    if size > MAX_KWARGS_BYTES:
        raise AgentInputError(f"chat_template_kwargs: {size} bytes as JSON, at most {MAX_KWARGS_BYTES}")
    return value


def check_tools(value: Any) -> list:
    """A request's tools: a list of at most MAX_TOOLS objects (JSON schemas, passed to the template as given)."""
    if not isinstance(value, list) or not value or len(value) > MAX_TOOLS or \
            not all(isinstance(t, dict) for t in value):
        raise AgentInputError(f"tools: a non-empty list of at most {MAX_TOOLS} objects (function schemas)")
    return value
