"""langchain-openai and instructor against the HTTP front, on the real SmolLM2, preempted as they go.

The modes that hand the schema to the grammar (instructor TOOLS and JSON_SCHEMA, LangChain's
``json_schema`` and ``function_calling``) pass at ``max_tokens`` 64, the size docs/structured.md
recommends for a small object. The modes that only describe the schema in the prompt
(instructor JSON and MD_JSON, LangChain's ``json_mode``) depend on the model following it,
which a 135M model does not (it echoes the schema back); what the daemon guarantees there,
one JSON object under ``json_object``, is asserted instead.
"""

from __future__ import annotations

import json

import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.conftest import DaemonProc

pytestmark = pytest.mark.slow
MAX_TOKENS = 64
TEXT = "Ann is 31 years old. Extract the person."


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def front(smollm2_dir, tmp_path_factory):
    d = DaemonProc("smollm2", tmp_path_factory.mktemp("libs"), "--backend", "hf", "--slots", "2",
                   "--quantum-tokens", "4", "--http", "127.0.0.1:0")  # fmt: skip
    d.base = d.urls["http"] + "/v1"
    d.model = OpenAI(base_url=d.base, api_key="x").models.list().data[0].id
    yield d
    d.stop()


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_modes_that_give_the_schema_to_the_grammar(front, mode):
    import instructor

    client = instructor.from_openai(OpenAI(base_url=front.base, api_key="x"), mode=getattr(instructor.Mode, mode))
    person = client.chat.completions.create(model=front.model, response_model=Person, max_tokens=MAX_TOKENS,
                                            max_retries=0, messages=[{"role": "user", "content": TEXT}])  # fmt: skip
    assert (person.name, person.age) == ("Ann", 31)


def test_json_mode_gets_one_json_object_even_if_the_model_ignores_the_schema(front):
    """instructor's JSON mode sends ``json_object`` with the schema in the prompt: the JSON holds, whatever it says."""
    schema = json.dumps(Person.model_json_schema(), indent=2)
    system = f"Provide the parsed objects in json that match the following json_schema:\n\n{schema}"
    r = OpenAI(base_url=front.base, api_key="x").chat.completions.create(
        model=front.model, max_tokens=MAX_TOKENS, response_format={"type": "json_object"},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": TEXT}],
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_langchain_invoke_stream_tools_and_structured_output(front):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=front.model, base_url=front.base, api_key="x", max_tokens=MAX_TOKENS, temperature=0,
                     stream_usage=True)  # fmt: skip
    assert llm.invoke("Say hello.").content
    chunks = list(llm.stream("Say hello."))
    total = chunks[0]
    for ch in chunks[1:]:
        total += ch
    assert total.content and total.usage_metadata["output_tokens"] > 0

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert called.tool_calls[0]["name"] == "get_weather" and called.tool_calls[0]["args"]["city"]
    assert "<tool_call>" not in called.content
    for method in ("json_schema", "function_calling"):
        assert llm.with_structured_output(Person, method=method).invoke(TEXT) == Person(name="Ann", age=31)
