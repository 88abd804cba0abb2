"""The checkpoint's chat template (agent/chat_template.py) against jinja2 rendering the same released template
directly, the way transformers documents it; chat_template_kwargs and tools in requests; the reasoning split,
also end to end over a real Mosquitto."""
from __future__ import annotations

import json
import random
import shutil
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

from agent import protocol as P
from agent.chat_template import CHATML, load_chat_template, split_reasoning
from agent.errors import AgentInputError
from agent.tokenizer import Tokenizer
from cli_helpers import run_cli
from mqtt_fixtures import EchoBackend

TEMPLATES = Path(__file__).parent / "data" / "templates"  # public copies: SOURCES.md there names them
WORDS = ["robot", "arm", "red block", "温度 23°C", "{{ not_a_variable }}", "{% raw %}", "<b>&amp;</b>", "it's",
         '"quoted"', "line\nbreak", "  spaced  ", "🤖", ""]


def released(name: str) -> dict:
    return json.loads((TEMPLATES / name / "tokenizer_config.json").read_text(encoding="utf-8"))


def reference_render(template: str, tok_cfg: dict, messages, add_generation_prompt=True, tools=None, **kwargs):
    """jinja2 on its own, set up as transformers' chat-templating docs describe: trim_blocks, lstrip_blocks,
    loopcontrols, a tojson that does not escape HTML, raise_exception; special tokens in scope."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)

    def raise_exception(message):
        raise jinja2.TemplateError(message)
    env.globals["raise_exception"] = raise_exception
    special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                       "additional_special_tokens") if tok_cfg.get(k)}
    return env.from_string(template).render(messages=messages, tools=tools, documents=None,
                                            add_generation_prompt=add_generation_prompt, **{**special, **kwargs})


def random_chat(rng: random.Random, end_with_user: bool = True) -> list[dict]:
    """System present or not, several turns, assistant turns with and without reasoning, tool results."""
    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5)))

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for turn in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": text()})
        if turn < 3 or not end_with_user:
            reply = text()
            if rng.random() < 0.4:
                reply = f"<think>\n{text()}\n</think>\n\n{reply}"
            messages.append({"role": "assistant", "content": reply})
            if rng.random() < 0.3:
                messages.append({"role": "tool", "content": text()})
                messages.append({"role": "assistant", "content": text()})
    if end_with_user and messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": text()})
    return messages


def tiny_folder(tiny_dense: Path, dest: Path, chat_template=None, jinja_file: str | None = None) -> Path:
    """The tiny model's tokenizer files with another chat template (None: no template at all)."""
    dest.mkdir()
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        shutil.copy(tiny_dense / name, dest / name)
    cfg = json.loads((tiny_dense / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja_file is not None:
        (dest / "chat_template.jinja").write_text(jinja_file)
    return dest


# --- rendering ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["minicpm4", "qwen3"])
def test_renders_released_templates_like_jinja2(name, seed):
    cfg = released(name)
    template = load_chat_template(TEMPLATES / name, cfg)
    assert template.source == "checkpoint" and template.reasoning == (name == "qwen3")
    rng = random.Random(seed)
    for _ in range(60):
        generation = rng.random() < 0.7
        messages = random_chat(rng, end_with_user=generation)
        kwargs = rng.choice([{}, {"enable_thinking": False}, {"enable_thinking": True}])
        want = reference_render(cfg["chat_template"], cfg, messages, generation, **kwargs)
        assert template.render(messages, add_generation_prompt=generation, **kwargs) == want


def test_minicpm4_template_is_chatml(seed):
    """The released MiniCPM4 template, the fallback and the kit's tiny folders all say ChatML."""
    from export.tiny import CHAT_TEMPLATE

    assert released("minicpm4")["chat_template"] == CHATML == CHAT_TEMPLATE
    rng = random.Random(seed)
    for _ in range(20):
        messages = random_chat(rng)
        chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert load_chat_template(TEMPLATES / "minicpm4", released("minicpm4")).render(messages) == \
            chatml + "<|im_start|>assistant\n"


def test_enable_thinking_changes_the_prompt(seed):
    cfg = released("qwen3")
    template = load_chat_template(TEMPLATES / "qwen3", cfg)
    messages = random_chat(random.Random(seed))
    on, off = template.render(messages), template.render(messages, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    assert off == reference_render(cfg["chat_template"], cfg, messages, enable_thinking=False)


def test_tools_reach_the_template_as_json(seed):
    cfg = released("qwen3")
    tools = [{"type": "function", "function": {"name": f"grip_{seed % 97}", "description": "closes <the> gripper & "
              "waits — ü", "parameters": {"type": "object", "properties": {"force": {"type": "number"}}}}}]
    messages = random_chat(random.Random(seed))
    got = load_chat_template(TEMPLATES / "qwen3", cfg).render(messages, tools=tools)
    assert got == reference_render(cfg["chat_template"], cfg, messages, tools=tools)
    assert json.dumps(tools[0], ensure_ascii=False) in got  # not HTML-escaped, not ASCII-escaped
    with pytest.raises(AgentInputError, match="does not use tools"):
        load_chat_template(TEMPLATES / "minicpm4", released("minicpm4")).render(messages, tools=tools)


def test_globals_filters_and_special_tokens(tmp_path):
    text = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
            "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}|{{ strftime_now('%Y') }}"
            "|{{ eos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role, ' + "
            "messages[0]['content']) }}{% endif %}")
    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "<|im_end|>", "chat_template": text}
    template = load_chat_template(tmp_path, cfg)
    user = [{"role": "user", "content": f"<{i}>"} for i in range(4)]
    assert template.render(user) == f'<s>"<0>""<1>"|{datetime.now().year}|<|im_end|>'
    assert template.render(user, eos_token="END").endswith("|END")  # request kwargs win over special tokens
    with pytest.raises(AgentInputError, match="no system role, be brief"):
        template.render([{"role": "system", "content": "be brief"}] + user)
    lines = ("{% for m in messages %}\n  {% if m.role == 'user' %}\n    U: {{ m.content }}\n  {% endif %}\n"
             "{% endfor %}")  # trim_blocks and lstrip_blocks: the block tags leave no blank lines or indents
    assert load_chat_template(tmp_path, {"chat_template": lines}).render(user) == \
        "".join(f"    U: <{i}>\n" for i in range(4))


def test_where_the_template_comes_from(tmp_path, tiny_dense):
    cfg_only = tiny_folder(tiny_dense, tmp_path / "a", chat_template="config {{ messages | length }}")
    both = tiny_folder(tiny_dense, tmp_path / "b", chat_template="config", jinja_file="file {{ messages[0].role }}")
    named = tiny_folder(tiny_dense, tmp_path / "c", chat_template=[
        {"name": "default", "template": "default"}, {"name": "tool_use", "template": "tools {{ tools | length }}"}])
    none = tiny_folder(tiny_dense, tmp_path / "d")
    chat = [{"role": "user", "content": "hi"}]
    assert Tokenizer(cfg_only).render_chat(chat) == "config 1"
    assert Tokenizer(both).render_chat(chat) == "file user"  # transformers: chat_template.jinja wins
    assert Tokenizer(named).render_chat(chat) == "default"
    assert Tokenizer(named).render_chat(chat, tools=[{"name": "f"}, {"name": "g"}]) == "tools 2"
    fallback = Tokenizer(none)
    assert fallback.chat_template_source == "chatml" and Tokenizer(cfg_only).chat_template_source == "checkpoint"
    assert fallback.render_chat(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    nameless = tiny_folder(tiny_dense, tmp_path / "e", chat_template=[{"name": "rag", "template": "x"}])
    with pytest.raises(AgentInputError, match="'default'"):
        Tokenizer(nameless)


def test_a_template_that_does_not_compile_is_refused_at_start(tmp_path, tiny_dense, broker, capsys):
    bad_file = tiny_folder(tiny_dense, tmp_path / "f", jinja_file="{% for m in messages %}{{ m.content }}")
    with pytest.raises(AgentInputError, match=r"chat_template\.jinja: the chat template does not compile"):
        Tokenizer(bad_file)
    bad = tiny_folder(tiny_dense, tmp_path / "g", chat_template="{{ messages[0 }}")
    shutil.copy(tiny_dense / "model.safetensors", bad / "model.safetensors")
    code, _, err = run_cli(capsys, "agent", "--torch-model", bad, "--broker", broker.url, "--device-id", "bad",
                           "--telemetry", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "tokenizer_config.json key 'chat_template': the chat template does not compile" in err


def test_tokenizer_encodes_what_the_template_renders(tmp_path, tiny_dense, seed):
    cfg = released("qwen3")
    tok = Tokenizer(tiny_folder(tiny_dense, tmp_path / "q", chat_template=cfg["chat_template"]))
    assert tok.chat_template_source == "checkpoint" and tok.splits_reasoning
    tiny_cfg = json.loads((tmp_path / "q" / "tokenizer_config.json").read_text())
    rng = random.Random(seed)
    for _ in range(10):
        messages = random_chat(rng)
        for kwargs in ({}, {"enable_thinking": False}):
            want = reference_render(cfg["chat_template"], tiny_cfg, messages, **kwargs)
            assert tok.encode_chat(messages, kwargs) == tok.encode(want)
    assert not Tokenizer(tiny_dense).splits_reasoning  # ChatML knows no reasoning


# --- the reasoning split ------------------------------------------------------------------------------
def test_special_reasoning_tokens_stay_in_the_text(tmp_path, tiny_dense, seed):
    """A vocabulary with <think> and </think> as special added tokens (so a plain skip-special decode drops
    them) keeps them in decoded text, and only them: the split still finds the reasoning."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    folder = tiny_folder(tiny_dense, tmp_path / "k", chat_template=released("qwen3")["chat_template"])
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")])
    hf.save(str(folder / "tokenizer.json"))
    tok = Tokenizer(folder)
    rng = random.Random(seed)
    thought, answer = " ".join(rng.choice(WORDS[:3]) for _ in range(3)), rng.choice(WORDS[:3])
    ids = tok.encode(f"<|im_start|><think>\n{thought}\n</think>\n\n{answer}<|im_end|>", bos=False)
    assert hf.token_to_id("</think>") in ids and hf.decode(ids, skip_special_tokens=True).count("think") == 0
    text = tok.decode(ids)
    assert "<|im_start|>" not in text and "<|im_end|>" not in text
    # (the tiny vocabulary's legacy sentencepiece normalizer puts a space after every special token)
    assert [part.strip() for part in split_reasoning(text)] == [thought, answer]
    plain = Tokenizer(tiny_folder(tiny_dense, tmp_path / "p", chat_template=CHATML))
    assert plain.decode(ids[:3]) == hf.decode(ids[:3], skip_special_tokens=True)


def test_split_reasoning_matches_the_templates_own_split(seed):
    """Qwen3's template takes a previous assistant turn apart into reasoning_content and content itself;
    rendering split_reasoning's two parts as those fields must give the same prompt."""
    cfg = released("qwen3")
    template = load_chat_template(TEMPLATES / "qwen3", cfg)
    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(WORDS[:4] + ["🤖", "x\ny", "a < b"]) for _ in range(n))
    for _ in range(40):
        thought, answer = words(rng.randint(1, 6)), words(rng.randint(0, 6))
        raw = rng.choice(["<think>\n{t}\n</think>\n\n{a}", "<think>{t}</think>{a}", "{t}\n</think>\n\n{a}",
                          "\n<think>\n\n{t}\n\n</think>\n{a}"]).format(t=thought, a=answer)
        reasoning, text = split_reasoning(raw)
        assert (reasoning, text) == (thought, answer)
        user = {"role": "user", "content": words(3)}
        as_raw = template.render([user, {"role": "assistant", "content": raw}], add_generation_prompt=False)
        as_split = template.render([user, {"role": "assistant", "content": text, "reasoning_content": reasoning}],
                                   add_generation_prompt=False)
        assert as_raw == as_split
    answer = words(5)
    assert split_reasoning(answer) == (None, answer)                    # no reasoning at all
    assert split_reasoning("<think>\nstill thinking") == ("still thinking", "")  # stopped by max_tokens


# --- requests --------------------------------------------------------------------------------------------
LIMITS = P.Limits(max_payload_bytes=16384)


def parse(**fields) -> P.Request:
    payload = {"id": "r", "reply_to": "r/1", "messages": [{"role": "user", "content": "hi"}], **fields}
    return P.parse_request(P.Inbound("cpm/v1/dev1/request", json.dumps(payload).encode()), LIMITS)


def test_requests_carry_template_kwargs_and_tools():
    req = parse(chat_template_kwargs={"enable_thinking": False, "style": {"n": [1, 2.5, None]}},
                tools=[{"type": "function", "function": {"name": "f"}}])
    assert req.chat_template_kwargs == {"enable_thinking": False, "style": {"n": [1, 2.5, None]}}
    assert req.tools == [{"type": "function", "function": {"name": "f"}}]
    assert parse(messages=None, prompt="hi", chat=True, chat_template_kwargs={"a": 1}).chat_template_kwargs == {"a": 1}
    assert parse().chat_template_kwargs is None and parse().tools is None


@pytest.mark.parametrize("fields, says", [
    ({"chat_template_kwargs": ["enable_thinking"]}, "must be an object"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "set by the agent"),
    ({"chat_template_kwargs": {"messages": []}}, "set by the agent"),
    ({"chat_template_kwargs": {"": 1}}, "non-empty strings"),
    ({"chat_template_kwargs": {f"k{i}": i for i in range(33)}}, "at most 32"),
    ({"chat_template_kwargs": {"k": "x" * 5000}}, "at most 4096"),
    ({"chat_template_kwargs": {"k": float("nan")}}, "no NaN"),
    ({"messages": None, "prompt": "hi", "chat_template_kwargs": {"a": 1}}, "only for a chat"),
    ({"tools": {"name": "f"}}, "tools: a non-empty list"),
    ({"tools": ["f"]}, "tools: a non-empty list"),
])
def test_bad_template_fields_are_refused(fields, says):
    with pytest.raises(P.RequestError) as e:
        parse(**fields)
    assert e.value.code == P.BAD_REQUEST and says in e.value.message and e.value.target.topic == "r/1"


# --- end to end over a real Mosquitto -----------------------------------------------------------------------
def test_chat_template_kwargs_and_reasoning_over_mqtt(broker, run_agent, make_client, tiny_dense, tmp_path):
    """EchoBackend answers with the prompt's own text up to the first <|im_end|> (an eos id): a user turn
    holding a <think> block comes back with it, `done` splits it off while the chunks stay raw. The kwargs
    reach the template: the prompt the agent counted is the one the template renders with them."""
    thinking = Tokenizer(tiny_folder(tiny_dense, tmp_path / "t", chat_template=released("qwen3")["chat_template"]))
    strict = Tokenizer(tiny_folder(tiny_dense, tmp_path / "s", chat_template=(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}"
        "{% endif %}" + CHATML)))
    run_agent(broker.url, backend=EchoBackend(max_seq=1024), tokenizer=thinking, device_id="dev1")  # tools: long
    run_agent(broker.url, backend=EchoBackend(), tokenizer=strict, device_id="dev2")
    client = make_client(broker.url, "dev1")
    assert client.wait_online(10) and client.status()["chat_template"] == "checkpoint"
    plain = [{"role": "user", "content": "Where is the red block?"}]
    tagged = [{"role": "user", "content": "<think>\nthe tray, left of the camera\n</think>\n\nOn the tray."}]

    def ask(c, chat, **fields):
        pending = c.submit(messages=chat, max_tokens=200, **fields)
        replies = []
        while not replies or replies[-1]["type"] == "chunk":
            replies.append(pending.inbox.get(timeout=10))
        return "".join(r["text"] for r in replies[:-1]), replies[-1]

    off = {"enable_thinking": False}
    raw, done = ask(client, tagged, chat_template_kwargs=off)
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    assert "</think>" in raw and (done["reasoning"], done["text"]) == split_reasoning(raw)
    assert done["text"] == "On the tray." and "</think>" not in done["reasoning"]
    assert done["usage"]["prompt_tokens"] == len(thinking.encode_chat(tagged, off)) > len(thinking.encode_chat(tagged))
    raw, done = ask(client, plain, chat_template_kwargs={"enable_thinking": True})
    assert done["type"] == "done" and "reasoning" not in done and done["text"] == raw
    assert done["usage"]["prompt_tokens"] == len(thinking.encode_chat(plain))
    tools = [{"type": "function", "function": {"name": "grip", "description": "close the gripper"}}]
    _, done = ask(client, plain, tools=tools)
    assert done["type"] == "done" and done["usage"]["prompt_tokens"] == len(thinking.encode_chat(plain, None, tools))
    _, refused = ask(make_client(broker.url, "dev2"), [{"role": "system", "content": "x"}] + plain)
    assert refused["type"] == "error" and refused["code"] == P.BAD_REQUEST
    assert "system messages are not supported" in refused["message"]
