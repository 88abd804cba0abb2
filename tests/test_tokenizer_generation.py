"""Tokenizer (bos, ChatML, eos, streaming) and the shared generation loop (sampling, stops, batching)."""
from __future__ import annotations

import functools
import random

import numpy as np
import pytest

from agent.generation import SamplingParams, generate, nucleus, sample
from agent.tokenizer import TextStream, Tokenizer
from agent.errors import AgentInputError

TEXTS = ["The robot arm picks up the red block.", "  leading spaces and ümlauts, 机器人, ☃ and 🤖 emoji",
         "line one\nline two\ttab", "x"]


@pytest.fixture(scope="module")
def tok(tiny_dense):
    return Tokenizer(tiny_dense)


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip_and_bos(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1 and ids.count(1) == 1
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=False) == ids[1:]


def test_chat_template_uses_single_special_tokens(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi robot"}]
    text = tok.render_chat(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi robot<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_chat(messages)
    im_start, im_end = 510, 511  # the tiny vocab puts them last, as the real one does
    assert ids[0] == 1 and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tok.decode(ids).split() == text.replace("<|im_start|>", " ").replace("<|im_end|>", " ").split()


def test_eos_is_the_union_of_config_and_generation_config(tiny_dense, tmp_path):
    import json, shutil
    path = shutil.copytree(tiny_dense, tmp_path / "m")
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = 7
    (path / "generation_config.json").write_text(json.dumps(gen))
    assert Tokenizer(path).eos_ids == [2, 7, 511]


@pytest.mark.parametrize("text", TEXTS)
def test_text_stream_equals_full_decode(tok, text):
    ids = tok.encode(text, bos=False)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)


def test_bad_messages(tok):
    with pytest.raises(AgentInputError, match=r"messages\[1\]"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])


# --- sampling ---------------------------------------------------------------------------------------
def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_and_degenerate_cuts_pick_the_argmax():
    rng = np.random.default_rng()
    logits = rng.normal(size=300).astype(np.float32)
    best = int(np.argmax(logits))
    assert sample(logits, SamplingParams(temperature=0), rng) == best
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), rng) == best
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-9), rng) == best


def test_sampling_follows_the_softmax():
    """Frequencies of 20,000 draws at temperature 0.7 match softmax(logits / 0.7) (chi-square, 6 bins)."""
    rng = np.random.default_rng()
    logits = rng.normal(size=6).astype(np.float32)
    p = softmax(logits.astype(np.float64) / 0.7)
    n = 20_000
    counts = np.bincount([sample(logits, SamplingParams(temperature=0.7), rng) for _ in range(n)], minlength=6)
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 25.7, (counts, n * p)  # 5 degrees of freedom: p < 1e-4 of a false alarm


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng()
    logits = np.array([3.0, 2.5, 2.0, -1.0, -2.0, -3.0], np.float32)
    seen_k = {sample(logits, SamplingParams(temperature=2.0, top_k=2), rng) for _ in range(400)}
    assert seen_k == {0, 1}
    p = softmax(logits.astype(np.float64))
    top_p = float(p[0] + p[1] + 0.5 * p[2])  # needs the first three tokens to reach it
    seen_p = {sample(logits, SamplingParams(temperature=1.0, top_p=top_p), rng) for _ in range(600)}
    assert seen_p == {0, 1, 2}


@pytest.mark.parametrize("vocab", [100, 600, 73448])
def test_nucleus_is_the_prefix_of_a_full_stable_sort(vocab):
    """The partial sort's nucleus equals the one of a full stable descending sort, on peaked and flat
    distributions and with many ties (logits rounded to a coarse grid), for random top_p."""
    rng = np.random.default_rng()
    for _ in range(30):
        logits = rng.normal(scale=rng.choice([0.5, 3.0, 12.0]), size=vocab)
        if rng.random() < 0.5:
            logits = np.round(logits * 2) / 2  # ties everywhere, also at the partition's edge
        probs = softmax(logits)
        top_p = float(rng.choice([rng.random(), 0.9, 0.999999]))
        order = np.array(sorted(range(vocab), key=lambda i: (-probs[i], i)))  # stable: lower index first
        cum = np.cumsum(probs[order])
        want = order[: int(np.searchsorted(cum, top_p)) + 1]
        assert np.array_equal(nucleus(probs, top_p), want)


# --- the loop, with a scripted backend --------------------------------------------------------------
class ScriptedBackend:
    """Emits a fixed token sequence per row, whatever the input: lets a test steer text exactly."""

    def __init__(self, scripts, vocab=512, max_batch=2, max_seq=64):
        self.scripts, self.vocab, self.max_batch, self.max_seq = scripts, vocab, max_batch, max_seq
        self.row_script, self.calls = {}, []

    def _logits(self, token):
        out = np.zeros(self.vocab, np.float32)
        out[token] = 10.0
        return out

    def prefill(self, row, ids):
        self.row_script[row] = iter(self.scripts[int(ids[-1])])
        self.calls.append(("prefill", row, len(ids)))
        return self._logits(next(self.row_script[row]))

    def decode(self, tokens, positions):
        self.calls.append(("decode", len(tokens), tuple(positions)))
        return np.stack([self._logits(next(self.row_script.get(r, iter([0])), 0)) for r in range(len(tokens))])


def test_stop_string_ends_the_answer_and_is_never_streamed(tok):
    words = tok.encode("Hello robot. STOP here", bos=False)
    backend = ScriptedBackend({5: words + [3] * 10})
    streamed = []
    (out,) = generate(backend, tok, [[1, 5]], [SamplingParams(max_tokens=30, stop=("STOP",))],
                      on_text=lambda i, d: streamed.append(d))
    assert out.text == "Hello robot. " and out.finish_reason == "stop"
    assert "".join(streamed) == out.text


def test_eos_and_max_tokens(tok):
    text_ids = tok.encode("Hello robot", bos=False)
    backend = ScriptedBackend({5: text_ids + [511, 3, 3], 6: [100] * 50})
    a, b = generate(backend, tok, [[1, 5], [1, 6]], [SamplingParams(max_tokens=20), SamplingParams(max_tokens=7)])
    assert (a.text, a.finish_reason, a.token_ids) == ("Hello robot", "stop", text_ids)
    assert (len(b.token_ids), b.finish_reason) == (7, "length")


def test_capacity_ends_with_length(tok):
    backend = ScriptedBackend({5: [100] * 100}, max_seq=10)
    (out,) = generate(backend, tok, [[1, 2, 3, 5]], [SamplingParams(max_tokens=50)])
    assert out.finish_reason == "length" and len(out.token_ids) == 10 - 4 + 1
    with pytest.raises(AgentInputError, match="at most 10 positions"):
        generate(backend, tok, [list(range(10))], [SamplingParams()])


def test_more_prompts_than_rows_wait_for_a_free_row(tok):
    scripts = {k: [100 + k] * (k + 1) + [511] for k in range(5)}
    backend = ScriptedBackend(scripts, max_batch=2)
    outs = generate(backend, tok, [[1, k] for k in range(5)], [SamplingParams(max_tokens=40) for _ in range(5)])
    assert [o.token_ids for o in outs] == [[100 + k] * (k + 1) for k in range(5)]
    assert max(c[1] for c in backend.calls if c[0] == "decode") <= 2


def test_batched_generation_equals_one_by_one_on_the_torch_model(tiny_dense):
    """Greedy answers of 5 prompts through 3 cache rows equal each prompt run alone."""
    from export.checkpoint import load_model
    from export.torch_backend import TorchBackend

    tokenizer = Tokenizer(tiny_dense)
    model = load_model(tiny_dense)
    prompts = [[1] + [random.randrange(3, 500) for _ in range(random.randint(3, 20))] for _ in range(5)]
    params = [SamplingParams(max_tokens=random.randint(4, 16)) for _ in prompts]
    batched = generate(TorchBackend(model, max_batch=3, max_seq=64), tokenizer, prompts, params)
    for prompt, p, got in zip(prompts, params, batched):
        (alone,) = generate(TorchBackend(model, max_batch=1, max_seq=64), tokenizer, [prompt], [p])
        assert got.token_ids == alone.token_ids


def test_cancel_frees_the_row_within_one_step(tok):
    from agent.generation import BatchGenerator

    backend = ScriptedBackend({5: [100] * 60, 6: [101] * 3 + [511]}, max_batch=1)
    batch = BatchGenerator(backend, tok)
    done, texts = {}, {}
    for key, last in (("a", 5), ("b", 6)):
        batch.add(key, [1, last], SamplingParams(max_tokens=50), on_text=lambda k, d: texts.setdefault(k, []).append(d),
                  on_done=lambda k, out: done.setdefault(k, []).append(out))
    for _ in range(3):
        batch.step()
    assert batch.cancel("a") and not batch.cancel("a")
    assert [o.finish_reason for o in done["a"]] == ["cancelled"] and len(done["a"][0].token_ids) == 4
    assert done["a"][0].text == "".join(texts["a"])
    while batch.step():
        pass
    assert done["b"][0].token_ids == [101] * 3 and done["b"][0].finish_reason == "stop"
    assert done["b"][0].time_to_first_token >= 0 and len(done) == 2


# --- chunked prefill, on the exported model in ONNX Runtime ----------------------------------------------
class Recording:
    """A real backend with its calls written down: ("prefill", row, start, n) and ("decode", rows)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.max_batch, self.max_seq = backend.max_batch, backend.max_seq

    def prefill(self, row, ids, start=0):
        self.calls.append(("prefill", row, start, len(ids)))
        return self.backend.prefill(row, ids, start)

    def decode(self, tokens, positions):
        self.calls.append(("decode", len(tokens)))
        return self.backend.decode(tokens, positions)


@pytest.mark.parametrize("variant, flavor", [("dense", "portable"), ("sparse", "portable"), ("sparse", "trt")])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(ort_export, variant, flavor, seed):
    """Greedy tokens of a long prompt (past the sparse model's dense_len) and two short ones, prefilled 16
    tokens at a time between decode steps, equal each prompt prefilled whole and run alone; the short
    prompts added after the long one get their first token first, and no prefill call exceeds the chunk.
    The trt flavor carries InfLLM v2's compressed keys as state (CpmAttention by its torch reference)."""
    from agent.onnxruntime_backend import OnnxRuntimeBackend

    export_dir = ort_export(variant, flavor)
    if flavor == "trt":
        from trt_plugins.onnxruntime_ops import session_options
        OnnxRuntimeBackend = functools.partial(OnnxRuntimeBackend, session_options=session_options())  # noqa: N806
    tokenizer = Tokenizer(export_dir)
    rng = random.Random(seed)
    small = variant == "sparse"  # its selection (portable) or reference attention (trt) costs: keep it short
    long = [1] + [rng.randrange(3, 500) for _ in range(rng.randint(140, 180) if small else rng.randint(200, 400))]
    shorts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(3, 30))] for _ in range(2)]
    prompts = [long, *shorts]
    params = [SamplingParams(max_tokens=rng.randint(4, 8) if small else rng.randint(8, 24))] + \
        [SamplingParams(max_tokens=12 if small else 48) for _ in shorts]
    alone = [generate(OnnxRuntimeBackend(export_dir, max_batch=1), tokenizer, [p], [sp])[0]
             for p, sp in zip(prompts, params)]
    backend = Recording(OnnxRuntimeBackend(export_dir, max_batch=3))
    chunked = generate(backend, tokenizer, prompts, params, prefill_chunk=16)
    assert [c.token_ids for c in chunked] == [a.token_ids for a in alone]
    assert all(c.token_ids for c in chunked)

    prefills = [(i, c) for i, c in enumerate(backend.calls) if c[0] == "prefill"]
    assert all(n <= 16 for _, (_, _, _, n) in prefills)
    long_calls = [(i, start, n) for i, (_, row, start, n) in prefills if row == 0]
    assert [start for _, start, _ in long_calls] == list(np.cumsum([0] + [n for *_, n in long_calls[:-1]]))
    assert sum(n for *_, n in long_calls) == len(long) and len(long_calls) >= len(long) // 16
    last_short = max(i for i, (_, row, _, _) in prefills if row != 0)
    assert last_short < long_calls[-1][0]  # the short prompts' first tokens came before the long one's
    # while a short prompt was still running, every step of the long prefill also decoded it
    short_steps = max(len(a.token_ids) - 1 + (a.finish_reason == "stop") for a in alone[1:])
    between = backend.calls[long_calls[0][0]:long_calls[-1][0]]
    assert sum(c[0] == "decode" for c in between) >= min(len(long_calls) - 1, short_steps) - 3


def test_a_prefill_chunk_must_be_positive(tok):
    from agent.generation import BatchGenerator

    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchGenerator(ScriptedBackend({}), tok, prefill_chunk=0)


def test_cancel_during_a_chunked_prefill_ends_it_once_and_frees_the_row(tok):
    from agent.generation import BatchGenerator
    from mqtt_fixtures import EchoBackend  # answers each prompt with its own tokens, chunks added up

    backend = EchoBackend(max_batch=1)
    batch = BatchGenerator(backend, tok, prefill_chunk=4)
    done = {}
    on_done = lambda k, out: done.setdefault(k, []).append(out)  # noqa: E731
    batch.add("long", [1] + [random.randrange(10, 500) for _ in range(40)], SamplingParams(max_tokens=5),
              on_done=on_done)
    echo = [random.randrange(10, 500) for _ in range(6)]
    batch.add("next", [1] + echo, SamplingParams(max_tokens=20), on_done=on_done)
    for _ in range(3):
        batch.step()
    assert batch.rows[0].prefilled == 12 and batch.cancel("long")
    while batch.step():
        pass
    assert [(o.finish_reason, o.token_ids) for o in done["long"]] == [("cancelled", [])]
    assert [(o.finish_reason, o.token_ids) for o in done["next"]] == [("stop", echo)]
