"""A vLLM tool-call parser for answers that are a bare JSON call, loaded *by vLLM*, never by inferd.

Passed to vLLM as `--tool-parser-plugin <this file> --tool-call-parser inferd_json` for catalog
models whose `tools.vllm_parser` is `inferd_json` (see inferd.engines.vllm). Those models get a
chat template (the catalog's `tools.chat_template`) that asks for a call as one JSON object,
`{"name": ..., "arguments": {...}}`, and renders earlier calls the same way: the format
llama.cpp's template analysis recognises on its own (no start marker), so both engines read the
same answers as tool calls.

vLLM's `llama3_json` parser reads exactly that format (non-streamed: every JSON object with a
`name` in the answer; streamed: an answer that starts with `{`), but refuses to start for
tokenizers without Llama 3's `<|python_tag|>` token. This subclass only points that marker at
a token every ChatML tokenizer has and no answer starts with (`<|im_start|>`), and drops
Llama's structural tag (its trigger is `<|python_tag|>`). `required` and named tool choices do
not use it: vLLM constrains those to a JSON schema built from the tools, but only for parsers
that say `supports_required_and_named`, which vLLM turns off for every parser class with a
structural tag (Llama's) and so for its subclasses: turned back on here. Without it vLLM
answers `required` with unconstrained prose and finish_reason "tool_calls" (seen).
"""

from __future__ import annotations

from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
from vllm.tool_parsers.llama_tool_parser import Llama3JsonToolParser


@ToolParserManager.register_module("inferd_json")
class BareJsonToolParser(Llama3JsonToolParser):  # type: ignore[misc]
    bot_token = "<|im_start|>"  # noqa: S105 (a token, not a secret)
    structural_tag_model = None
    supports_required_and_named = True
