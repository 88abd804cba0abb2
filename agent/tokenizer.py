"""MiniCPM4 tokenizer on the `tokenizers` library alone (no transformers): bos, chat template, eos ids.

Reads tokenizer.json, and bos/eos ids from config.json and generation_config.json (the union of their
eos lists, as the published checkpoints spread them over both files). Chats are rendered with the folder's
own chat template (agent/chat_template.py), ChatML when it has none.
"""
from __future__ import annotations

import json
from pathlib import Path

from agent.chat_template import THINK_CLOSE, THINK_OPEN, load_chat_template
from agent.errors import AgentInputError

CHAT_ROLES = ("system", "user", "assistant", "tool")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AgentInputError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise AgentInputError(f"{path}: expected a JSON object")
    return data


def _ids(value, path: Path, key: str) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise AgentInputError(f"{path}: key '{key}' must be an integer or a list of integers")
    return values


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise AgentInputError(f"{path}: file not found (every MiniCPM4 folder ships one)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise AgentInputError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = _read_json(model_dir / "config.json")
        gen = _read_json(model_dir / "generation_config.json")
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        self.bos_id = gen.get("bos_token_id", config.get("bos_token_id", 1))
        eos = (_ids(config.get("eos_token_id"), model_dir / "config.json", "eos_token_id")
               + _ids(gen.get("eos_token_id"), model_dir / "generation_config.json", "eos_token_id"))
        self.eos_ids = sorted(set(eos)) or [2]
        self.add_bos = bool(tok_cfg.get("add_bos_token", True))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k") if k in gen}
        added = self._tok.get_added_tokens_decoder()
        self.chat_template = load_chat_template(model_dir, tok_cfg, frozenset(t.content for t in added.values()))
        self.chat_template_source = self.chat_template.source  # "checkpoint" | "chatml"
        self.splits_reasoning = self.chat_template.reasoning   # replies carry <think>...</think>
        # Special tokens are not text, but reasoning tags must stay in it (the split reads them): when they
        # are special, decode skips the other special tokens itself.
        special = {i for i, t in added.items() if t.special}
        think = {i for i, t in added.items() if t.content in (THINK_OPEN, THINK_CLOSE)} & special
        self._skip_ids = frozenset(special - think) if self.splits_reasoning and think else None

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with bos prepended (unless the tokenizer already added it)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def render_chat(self, messages: list[dict], template_kwargs: dict | None = None,
                    tools: list | None = None) -> str:
        """The chat in the checkpoint's template, ending with the assistant's turn opened."""
        if not isinstance(messages, list) or not messages:
            raise AgentInputError("messages: expected a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise AgentInputError(f"messages[{i}]: needs 'role' (one of {', '.join(CHAT_ROLES)}) "
                                      f"and a string 'content'")
        return self.chat_template.render(messages, add_generation_prompt=True, tools=tools,
                                         **(template_kwargs or {}))

    def encode_chat(self, messages: list[dict], template_kwargs: dict | None = None,
                    tools: list | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, template_kwargs, tools))

    def json_text(self) -> str:
        """The tokenizer.json this tokenizer was read from, as text (what grammar libraries build from)."""
        return self._tok.to_str()

    def decode(self, ids: list[int]) -> str:
        if self._skip_ids is None:
            return self._tok.decode(list(ids), skip_special_tokens=True)
        return self._tok.decode([i for i in ids if i not in self._skip_ids], skip_special_tokens=False)


class TextStream:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decoding token by token loses the leading space of sentencepiece pieces and breaks UTF-8 sequences
    spread over byte-fallback tokens. Decoding a short window that starts a few tokens back and emitting
    only what is new does neither, at constant cost per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decoding window
        self._read = 0    # tokens before this are already in self.text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        seen = decode(self.ids[self._prefix:self._read])
        window = decode(self.ids[self._prefix:])
        if window.endswith("\ufffd") or len(window) <= len(seen):
            return ""  # an incomplete UTF-8 sequence (or a token with no text yet): wait for more
        delta = window[len(seen):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
