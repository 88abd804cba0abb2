"""The one generation loop every backend shares (torch, ONNX Runtime, TensorRT): numpy only.

A backend owns a KV cache of `max_batch` rows x `max_seq` positions and offers two calls:
  prefill(row, ids, start)   -> logits (V,) of the last token given; ids written into cache row `row` at
                                positions start .. start + len(ids) - 1 (attending to what the row holds)
  decode(tokens, positions)  -> logits (n, V), one new token for each of rows 0..n-1
Requests beyond max_batch wait and take the first row that frees up (continuous batching). With a prefill
chunk, a long prompt is prefilled over several steps, each step also decoding the rows already running, so
one long prompt never stalls the other streams (nor a scheduler's heartbeat) for a whole prefill.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import numpy as np

from agent.errors import AgentInputError
from agent.tokenizer import TextStream, Tokenizer


class Backend(Protocol):
    max_batch: int
    max_seq: int

    def prefill(self, row: int, ids: np.ndarray, start: int = 0) -> np.ndarray: ...

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray: ...


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    top_k: int = 0             # 0: no top-k cut
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def validate(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise AgentInputError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (0 <= self.temperature <= 100):
            raise AgentInputError(f"temperature: must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise AgentInputError(f"top_p: must be a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise AgentInputError(f"top_k: must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise AgentInputError(f"seed: must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise AgentInputError("stop: must be a list of non-empty strings")


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (eos or a stop string), "length" or "cancelled"
    time_to_first_token: float = 0.0  # seconds from admission to the first token
    decode_seconds: float = 0.0       # from the first token to the last

    @property
    def tokens_per_second(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from fp32 logits (V,): greedy at temperature 0, else top-k, then top-p."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = nucleus(probs, params.top_p)
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


NUCLEUS_CANDIDATES = (256, 4096)  # most likely tokens sorted first; a full sort of 73k costs ~10 ms a row


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most likely tokens whose probability reaches top_p, in the order of a
    stable descending sort (ties: lower index first). The top candidates are partitioned out and sorted alone
    when they already reach top_p strictly above the best token left out (then they are that sort's prefix);
    otherwise the whole vocabulary is sorted."""
    for m in NUCLEUS_CANDIDATES:
        if probs.size <= 2 * m:
            break
        top = np.argpartition(probs, -m)[-m:]
        order = top[np.lexsort((top, -probs[top]))]
        i = int(np.searchsorted(np.cumsum(probs[order]), top_p))
        if i < m - 1 and probs[order[i]] > probs[order[-1]]:
            return order[:i + 1]
    order = np.argsort(-probs, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]


class _Request:
    """One prompt in flight: its row, position, sampler, and text stream with stop-string hold-back."""

    def __init__(self, key, ids, params, tokenizer, on_text, on_done, constraint=None):
        self.key, self.ids, self.params = key, ids, params
        self.constraint = constraint  # agent/constraints.Constraint (a grammar's token mask), or None
        self.on_text, self.on_done = on_text, on_done
        self.rng = np.random.default_rng(params.seed)
        self.stream = TextStream(tokenizer)
        self.out = Completion(prompt_tokens=len(ids))
        self.emitted = 0  # characters of stream.text already handed to the callback
        self.row = -1
        self.prefilled = 0   # prompt tokens already written into the cache row
        self.pos = len(ids)  # position the next token will take
        self.last = -1
        self.started = self.first_token_at = 0.0

    def accept(self, token: int, eos_ids, max_seq: int, complete: bool = False) -> str:
        """Record a sampled token; return the text that may be shown now. complete: the request's grammar
        can take nothing more (it ends with "stop", even at max_tokens)."""
        out, params = self.out, self.params
        if token in eos_ids:
            out.finish_reason = "stop"
            return self._flush(len(self.stream.text))
        out.token_ids.append(token)
        self.stream.push(token)
        text = self.stream.text
        for s in params.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                out.finish_reason = "stop"
                return self._flush(at)
        if complete:
            out.finish_reason = "stop"
            return self._flush(len(text))
        if len(out.token_ids) >= params.max_tokens or self.pos >= max_seq:
            out.finish_reason = "length"
            return self._flush(len(text))
        hold = max((_overlap(text, s) for s in params.stop), default=0)  # may be the start of a stop string
        return self._flush(len(text) - hold, final=False)

    def _flush(self, end: int, final: bool = True) -> str:
        text = self.stream.text
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if final:
            self.out.text = text[:end]
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class BatchGenerator:
    """Continuous batching over a backend's cache rows, one step at a time.

    add() queues a prompt; step() admits queued prompts into free rows, prefills at most `prefill_chunk`
    prompt tokens in all (the prompts with the fewest tokens left first, so a short prompt is not held
    behind a long one), then runs one decode for every row whose prompt is in. None: every prompt whole.
    Callbacks run on the caller's thread: on_text(key, delta) with text as it is made, on_done(key,
    Completion) once. Not thread-safe: one owner calls add/cancel/step. A request added with a constraint
    (structured output, agent/constraints.py) samples only tokens its grammar allows and ends when the grammar
    is complete; `masks` computes the constrained rows' masks while the backend decodes (else each row's
    mask is computed as it samples).
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer, clock=time.perf_counter,
                 prefill_chunk: Optional[int] = None, masks=None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk!r}")
        self.backend, self.tokenizer, self.clock = backend, tokenizer, clock
        self.prefill_chunk = prefill_chunk
        self.masks = masks  # agent/constraints.Grammars: computes constrained rows' masks during decode
        self.eos = set(tokenizer.eos_ids)
        self.rows: list[Optional[_Request]] = [None] * backend.max_batch
        self.waiting: deque[_Request] = deque()

    def check(self, ids: list[int], params: SamplingParams):
        """Raise AgentInputError if this prompt cannot run (before it is queued)."""
        params.validate()
        if not ids:
            raise AgentInputError("prompt: empty")
        if len(ids) >= self.backend.max_seq:
            raise AgentInputError(f"prompt: {len(ids)} tokens, but the model holds at most "
                                  f"{self.backend.max_seq} positions (prompt + answer)")

    def add(self, key, ids: list[int], params: SamplingParams, on_text=None, on_done=None, constraint=None):
        """constraint: a compiled grammar (agent/constraints.Constraint) every token of the answer obeys."""
        self.check(ids, params)
        self.waiting.append(_Request(key, list(ids), params, self.tokenizer, on_text, on_done, constraint))

    def cancel(self, key) -> bool:
        """Finish a queued or running request now with finish_reason "cancelled"."""
        for req in list(self.waiting):
            if req.key == key:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
                return True
        for req in self.rows:
            if req is not None and req.key == key:
                self._finish(req, "cancelled")
                return True
        return False

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.active > 0

    def step(self) -> bool:
        """Admit, prefill up to one chunk, then decode once; returns whether work remains."""
        for row in range(len(self.rows)):
            if self.rows[row] is None and self.waiting:
                req = self.waiting.popleft()
                req.row, self.rows[row] = row, req
                req.started = self.clock()
        self._prefill()
        active = [r for r in self.rows if r is not None]
        decoding = [r for r in active if r.prefilled == len(r.ids)]
        if decoding:
            n = max(r.row for r in decoding) + 1
            tokens, positions = np.zeros(n, np.int64), np.zeros(n, np.int64)
            for r in active:
                if r.row < n:  # a row still prefilling gets a throw-away token where its next chunk will write
                    tokens[r.row], positions[r.row] = (r.last, r.pos) if r in decoding else (0, r.prefilled)
            constrained = [r.constraint for r in decoding if r.constraint is not None]
            masks_done = self.masks.start_masks(constrained) if constrained and self.masks else None
            logits = self.backend.decode(tokens, positions)  # the masks are computed meanwhile
            if masks_done:
                masks_done()
            for r in decoding:
                if self.rows[r.row] is r:  # not cancelled by a callback meanwhile
                    r.pos += 1
                    self._accept(r, logits[r.row])
        return self.busy

    def _prefill(self):
        """Write at most prefill_chunk prompt tokens this step; a prompt whose last token is in samples its
        first token from the logits of that last chunk."""
        budget = self.prefill_chunk or sys.maxsize
        todo = sorted((r for r in self.rows if r is not None and r.prefilled < len(r.ids)),
                      key=lambda r: (len(r.ids) - r.prefilled, r.started))
        for req in todo:
            if budget <= 0:
                break
            if self.rows[req.row] is not req:  # cancelled by a callback meanwhile
                continue
            start = req.prefilled
            chunk = req.ids[start:start + budget]
            ids = np.asarray(chunk, dtype=np.int64)
            # a whole prompt is the plain call every backend has; a later chunk says where it starts
            logits = self.backend.prefill(req.row, ids, start) if start else self.backend.prefill(req.row, ids)
            req.prefilled += len(chunk)
            budget -= len(chunk)
            if req.prefilled == len(req.ids):
                self._accept(req, logits)

    def _accept(self, req: _Request, logits: np.ndarray):
        now = self.clock()
        if not req.out.token_ids and not req.first_token_at:
            req.first_token_at = now
            req.out.time_to_first_token = now - req.started
        complete = False
        if req.constraint is None:
            token = sample(logits, req.params, req.rng)
        else:
            token = sample(req.constraint.apply(logits), req.params, req.rng)
            complete = token not in self.eos and req.constraint.advance(token)
        delta = req.accept(token, self.eos, self.backend.max_seq, complete)
        if delta and req.on_text:
            req.on_text(req.key, delta)
        if req.out.finish_reason:
            self._finish(req, req.out.finish_reason)
        else:
            req.last = req.out.token_ids[-1]

    def _finish(self, req: _Request, reason: str):
        if req.row >= 0 and self.rows[req.row] is req:
            self.rows[req.row] = None
        out = req.out
        if reason == "cancelled":
            out.text = req.stream.text[:req.emitted]
        out.finish_reason = reason
        out.decode_seconds = (self.clock() - req.first_token_at) if req.first_token_at else 0.0
        if req.on_done:
            req.on_done(req.key, out)


def generate(backend: Backend, tokenizer: Tokenizer, prompts: list[list[int]], params: list[SamplingParams],
             on_text: Callable[[int, str], None] | None = None,
             prefill_chunk: Optional[int] = None) -> list[Completion]:
    """Run every prompt to completion; on_text(i, delta) streams prompt i's text as it is made."""
    if len(prompts) != len(params):
        raise ValueError("one SamplingParams per prompt")
    batch = BatchGenerator(backend, tokenizer, prefill_chunk=prefill_chunk)
    for i, (ids, p) in enumerate(zip(prompts, params)):
        try:
            batch.check(ids, p)
        except AgentInputError as e:
            raise AgentInputError(f"prompt {i}: {str(e).removeprefix('prompt: ')}") from None
    done: list[Optional[Completion]] = [None] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, params)):
        batch.add(i, ids, p, on_text, lambda key, out: done.__setitem__(key, out))
    while batch.step():
        pass
    return done
