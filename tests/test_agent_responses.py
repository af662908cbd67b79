"""Agent libraries that speak the Responses API, against the HTTP front on the real SmolLM2.

openai-agents with its default model class (``OpenAIResponsesModel``) and a function tool: the
model calls it, the library runs it and sends its output back as a ``function_call_output``
item, and the model answers.  pydantic-ai's ``OpenAIResponsesModel`` and litellm's
``responses()`` each get an answer.  What the 135M model says is not asserted, only that each
library's own parsing of our responses holds and the daemon saw the turns it should.
"""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import DaemonProc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    d = DaemonProc("smollm2", tmp_path_factory.mktemp("responses-libs"), "--slots", "2", "--quantum-tokens", "4",
                   "--http", "127.0.0.1:0")  # fmt: skip
    d.base = d.urls["http"] + "/v1"
    d.model = OpenAI(base_url=d.base, api_key="x").models.list().data[0].id
    yield d
    d.stop()


def _responses_served(d: DaemonProc) -> int:
    return d.log().count("path=/v1/responses status=200")


def test_openai_agents_default_model_calls_a_function_tool_and_answers(front):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # no trace export to a service this machine cannot reach
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        calls.append(city)
        return f"sunny, 21 C in {city}"

    model = agents.OpenAIResponsesModel(model=front.model, openai_client=AsyncOpenAI(base_url=front.base, api_key="x"))
    settings = agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=64)
    agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=model,
                         model_settings=settings)  # fmt: skip
    served = _responses_served(front)
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert calls == ["Paris"]  # the call came back as the library's own function_call item, parsed
    assert isinstance(result.final_output, str) and result.final_output
    items = [type(item).__name__ for item in result.new_items]
    assert "ToolCallItem" in items and "ToolCallOutputItem" in items and items[-1] == "MessageOutputItem"
    assert _responses_served(front) - served == 2  # the call, then the answer to its output


def test_pydantic_ai_responses_model_gets_an_answer(front):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel(front.model, provider=OpenAIProvider(base_url=front.base, api_key="x"))
    served = _responses_served(front)
    settings = {"max_tokens": 16, "temperature": 0}
    result = Agent(model, instructions="Be brief.").run_sync("Name a color.", model_settings=settings)
    assert isinstance(result.output, str) and result.output
    usage = result.usage() if callable(result.usage) else result.usage
    assert usage.output_tokens > 0 and _responses_served(front) - served == 1


def test_litellm_responses_gets_an_answer(front, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its price list from the package, not the network
    litellm = pytest.importorskip("litellm")
    r = litellm.responses(model=f"openai/{front.model}", input="Name a color.", api_base=front.base, api_key="x",
                          max_output_tokens=16, temperature=0)  # fmt: skip
    assert r.status in ("completed", "incomplete") and r.output[0].content[0].text
    assert r.usage.output_tokens == 16 or r.status == "completed"
