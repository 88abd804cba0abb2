"""Structured output: a request's `response_format` or `grammar` becomes a token mask at every step.

llguidance (Rust core, no torch) compiles a JSON Schema, a regex or a Lark grammar against the model's
vocabulary into a matcher. Before each token the matcher gives a bitmask of the tokens that keep the output
inside the grammar; the generation loop sets every other logit to -inf (greedy and sampled decoding both obey
it), feeds the chosen token back, and stops the request when the matcher has nothing more to add. End of
sequence is allowed only where the grammar accepts. Three pieces:
  parse_constraint(data, max_bytes)  the request keys -> a ConstraintSpec (pure; no llguidance needed)
  Grammars(tokenizer)                one per agent: the vocabulary index (built once) and the compile step;
                                     computes the masks of a batch's constrained rows in a worker thread
                                     while the backend runs the step (start_masks)
  Constraint                         one per request: its matcher and the mask of its next token
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from agent.errors import AgentInputError

log = logging.getLogger("cpm-edge.agent")

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
GRAMMAR_TYPES = ("regex", "lark")
JSON_SCHEMA_KEYS = {"schema", "name", "strict", "description"}  # OpenAI's json_schema object
# Compact JSON (no free whitespace between tokens): a small model cannot wander off into blank space, and the
# answer costs fewer tokens. A schema may still say otherwise in its own "x-guidance" options.
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_ERROR_CHARS = 300
_NEG_INF_BITS = np.float32(-np.inf).view(np.uint32)


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asked for: kind is json_object, json_schema, regex or lark; source the schema or text."""
    kind: str
    source: Any
    key: str  # the request key it came from (named in errors)

    @property
    def wants_json(self) -> bool:
        return self.kind in ("json_object", "json_schema")


def parse_constraint(data: dict, max_bytes: int) -> Optional[ConstraintSpec]:
    """The constraint of a request's JSON object, or None; raises AgentInputError naming the bad key.

    Accepts OpenAI's response_format ({"type": "text" | "json_object"}, {"type": "json_schema", "json_schema":
    {"schema": {...}, "name", "strict", "description"}}) or a grammar ({"type": "regex", "regex": "..."} or
    {"type": "lark", "lark": "..."}); at most one of the two. The schema or grammar text may take at most
    max_bytes (as compact JSON / UTF-8).
    """
    fmt, grammar = data.get("response_format"), data.get("grammar")
    if fmt is not None and grammar is not None:
        raise AgentInputError("give at most one of 'response_format' or 'grammar'")
    if fmt is not None:
        return _response_format(fmt, max_bytes)
    if grammar is not None:
        return _grammar(grammar, max_bytes)
    return None


def _response_format(fmt, max_bytes: int) -> Optional[ConstraintSpec]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise AgentInputError(f"response_format: expected an object with 'type' one of {', '.join(RESPONSE_FORMATS)}")
    extra = sorted(set(fmt) - ({"type", "json_schema"} if kind == "json_schema" else {"type"}))
    if extra:
        raise AgentInputError(f"response_format.{extra[0]}: unknown key for type {kind}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object", {"type": "object"}, "response_format")
    js = fmt.get("json_schema")
    if not isinstance(js, dict):
        raise AgentInputError("response_format.json_schema: expected an object with 'schema' (a JSON Schema)")
    extra = sorted(set(js) - JSON_SCHEMA_KEYS)
    if extra:
        raise AgentInputError(f"response_format.json_schema.{extra[0]}: unknown key "
                              f"(known: {', '.join(sorted(JSON_SCHEMA_KEYS))})")
    for key, kind_ok, what in (("name", str, "a string"), ("description", str, "a string"),
                               ("strict", bool, "true or false")):
        if key in js and not isinstance(js[key], kind_ok):
            raise AgentInputError(f"response_format.json_schema.{key}: must be {what}")
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise AgentInputError("response_format.json_schema.schema: must be a JSON Schema object, got "
                              f"{'nothing' if schema is None else type(schema).__name__}")
    try:
        size = len(json.dumps(schema, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    except RecursionError:
        raise AgentInputError("response_format.json_schema.schema: nested too deeply") from None
    if size > max_bytes:
        raise AgentInputError(f"response_format.json_schema.schema: {size} bytes, the limit is {max_bytes}")
    return ConstraintSpec("json_schema", schema, "response_format")


def _grammar(grammar, max_bytes: int) -> ConstraintSpec:
    kind = grammar.get("type") if isinstance(grammar, dict) else None
    if kind not in GRAMMAR_TYPES:
        raise AgentInputError('grammar: expected {"type": "regex", "regex": "..."} or '
                              '{"type": "lark", "lark": "..."}')
    extra = sorted(set(grammar) - {"type", kind})
    if extra:
        raise AgentInputError(f"grammar.{extra[0]}: unknown key for type {kind}")
    text = grammar.get(kind)
    if not isinstance(text, str) or not text:
        raise AgentInputError(f"grammar.{kind}: must be a non-empty string")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise AgentInputError(f"grammar.{kind}: {size} bytes, the limit is {max_bytes}")
    return ConstraintSpec(kind, text, "grammar")


class Constraint:
    """One request's matcher and the bitmask (int32 words, bit i of word w = token 32w+i) of its next token."""

    def __init__(self, matcher, spec: ConstraintSpec):
        self.matcher, self.spec = matcher, spec
        self.mask: Optional[np.ndarray] = None  # None: not computed for the current state yet

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Logits (V,) with every token the grammar does not allow now at -inf (a new array)."""
        if self.mask is None:
            self.fill_mask()
        v = logits.shape[-1]
        n = min(v, self.mask.size * 32)  # tokens past the library's vocabulary (padding rows) stay out
        # bit arithmetic, not np.where: ~4x faster on a 73k vocabulary (a branch-free pass per step and row)
        drop = np.zeros(v, np.uint32)
        drop[:n] = np.unpackbits(self.mask.view(np.uint8), count=n, bitorder="little")
        drop -= 1  # 0 where allowed, all ones where not (unsigned wrap-around)
        out = np.ascontiguousarray(logits, np.float32).view(np.uint32) & ~drop
        out |= drop & _NEG_INF_BITS
        return out.view(np.float32)

    def fill_mask(self):
        """The mask of the next token, computed now on this thread (one row; Grammars.fill_masks does many)."""
        self.mask = np.frombuffer(self.matcher.compute_bitmask(), np.int32)

    def advance(self, token: int) -> bool:
        """Feed the chosen token; True when the grammar is complete (nothing more may follow)."""
        self.mask = None
        if not self.matcher.consume_token(token):  # cannot happen with the mask applied; keep the request sane
            log.warning("grammar matcher refused token %d: %s", token, self.matcher.get_error())
            return True
        return self.matcher.is_stopped()


class Grammars:
    """One per agent: the llguidance view of the vocabulary (costly: built once), the compile step, and the
    batched mask computation. Thread-safe compile. background: build the vocabulary index in a thread now, so
    the first constrained request does not hold up the scheduler for it."""

    def __init__(self, tokenizer, threads: Optional[int] = None, background: bool = False):
        self.tokenizer, self.threads = tokenizer, threads
        # On 2 cores one parallel call for 4-8 rows took ~2x longer than row by row (bench/agent.py, mask_cost):
        # the library's thread pool only pays where there are cores to spread over.
        self.parallel = (threads or os.cpu_count() or 1) > 2
        self._lock = threading.Lock()
        self._llg = self._lltokenizer = self._executor = None
        self._worker: Optional[ThreadPoolExecutor] = None
        if background:
            threading.Thread(target=self._ready_quietly, name="cpm-grammar-vocab", daemon=True).start()

    def _ready_quietly(self):
        try:
            self.ready()
        except AgentInputError as e:  # no llguidance: constrained requests will say so
            log.info("structured output off: %s", e)

    def ready(self):
        """Build the vocabulary index now, if not yet (~1.4 s for 73k tokens on a busy 2-core x86); returns the
        llguidance module."""
        with self._lock:
            if self._lltokenizer is None:
                try:
                    import llguidance
                except ImportError:
                    raise AgentInputError("structured output needs the llguidance package on the agent "
                                          "(pip install 'minicpm-edge[agent]')") from None
                # the tokenizers library's own JSON: llguidance reads tokenizer.json without transformers
                self._lltokenizer = llguidance.LLTokenizer(self.tokenizer.json_text(),
                                                           eos_token=list(self.tokenizer.eos_ids))
                self._executor = llguidance.LLExecutor(self.threads)
                self._llg = llguidance
        return self._llg

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """A fresh matcher for one request; AgentInputError (one line, naming the key) if the library rejects
        the schema or grammar."""
        llg = self.ready()
        LLMatcher = llg.LLMatcher
        try:
            if spec.wants_json:
                grammar = LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(spec.source)
            else:
                grammar = LLMatcher.grammar_from_lark(spec.source)
            matcher = LLMatcher(self._lltokenizer, grammar, log_level=0,
                                limits=llg.LLParserLimits(verbose_errors=False))
        except ValueError as e:
            raise AgentInputError(f"{spec.key}: {_one_line(str(e))}") from None
        except Exception as e:  # untrusted input into a native library: refuse the request, keep the scheduler
            log.exception("%s: llguidance failed to compile it", spec.key)
            raise AgentInputError(f"{spec.key}: could not be compiled ({type(e).__name__})") from None
        if matcher.is_error():
            what = "schema" if spec.wants_json else f"{spec.kind} grammar"
            raise AgentInputError(f"{spec.key}: the {what} is not supported: {_one_line(matcher.get_error())}")
        return Constraint(matcher, spec)

    def start_masks(self, constraints: list[Constraint]) -> Callable[[], None]:
        """Compute the next-token masks of these constraints (fill_masks) in a worker thread: llguidance and
        the backends release the GIL, so it overlaps the backend's step. Call the result to wait."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="cpm-grammar-masks")
        job = self._worker.submit(self.fill_masks, list(constraints))
        return job.result

    def fill_masks(self, constraints: list[Constraint], parallel: Optional[bool] = None):
        """The masks of these constraints, computed now: in one parallel llguidance call (LLExecutor) for
        several rows on a machine with more than 2 cores, else row by row. parallel: force one way."""
        if parallel is None:
            parallel = self.parallel and len(constraints) > 1
        if not parallel:
            for c in constraints:
                c.fill_mask()
            return
        words = (self._lltokenizer.vocab_size + 31) // 32
        masks = np.full((len(constraints), words), -1, np.int32)  # C-contiguous, written in place
        self._executor.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(constraints)],
                                               masks.ctypes.data, words * 4, len(constraints))
        for c, row in zip(constraints, masks):
            c.mask = row


def _one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def parsed_json(spec: Optional[ConstraintSpec], finish_reason: str, text: str):
    """The JSON value of a finished answer to a json_object/json_schema request, else None (no constraint,
    not JSON, or cut by max_tokens: finish_reason "length")."""
    if spec is None or not spec.wants_json or finish_reason != "stop":
        return None
    try:
        return json.loads(text)
    except ValueError:  # a stop string cut it, or a refused token ended it early
        return None
