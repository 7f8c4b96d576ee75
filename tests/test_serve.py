"""lora serve, tested as a client would use it: a real server process on 127.0.0.1 serving the embedded SmolLM2
with two adapters on it, driven with the official `openai` client (chat, streaming, completions, the adapters,
bad requests, the API key)."""

import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_merge import make_adapter

openai = pytest.importorskip("openai")
KEY = "sk-local-test"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(embedded_dir, tmp_path_factory):
    return [make_adapter(embedded_dir, tmp_path_factory.mktemp("served") / name, seed=seed)
            for name, seed in (("pirate", 1), ("poet", 2))]


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "lora_cli", "serve", *map(str, adapters), "--port", str(port), "--api-key", KEY],
            cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:  # bounded: the models load, then the port answers
        if process.poll() is not None:
            pytest.fail(f"lora serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"lora serve did not start in 300 s:\n{log.read_text()[-3000:]}")
    yield openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120), url, log
    process.terminate()
    process.wait(timeout=30)


def chat(client, model, **options):
    return client.chat.completions.create(model=model, messages=QUESTION, **{"temperature": 0, "max_tokens": 8,
                                                                             **options})


def test_models_lists_the_base_and_both_adapters(server):
    client, _, _ = server
    listed = {m.id: m.owned_by for m in client.models.list()}
    assert listed["pirate"].startswith("adapter on ") and listed["poet"].startswith("adapter on ")
    assert "base model" in listed.values() and len(listed) == 3


def test_chat_answers_as_lora_generate_does(server, adapters):
    from lora_cli.generate import Sampling, generate

    client, _, _ = server
    reply = chat(client, "pirate")
    expected = generate(str(adapters[0]), [QUESTION[0]["content"]], sampling=Sampling(max_new_tokens=8))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == expected.completion_tokens and reply.usage.prompt_tokens > 10


def test_two_adapters_and_the_base_share_one_model_and_answer_differently(server):
    client, _, _ = server
    base = next(m.id for m in client.models.list() if m.owned_by == "base model")
    answers = {name: chat(client, name).choices[0].message.content for name in ("pirate", "poet", base)}
    answers["pirate2"] = chat(client, "pirate").choices[0].message.content
    assert len({answers["pirate"], answers["poet"], answers[base]}) == 3, answers
    assert answers["pirate"] == answers["pirate2"]  # switching back is exact
    assert answers[base].startswith("The capital of France")


def test_streaming_sends_the_same_answer_in_pieces(server):
    client, _, _ = server
    base = next(m.id for m in client.models.list() if m.owned_by == "base model")
    pieces = [c.choices[0].delta.content or "" for c in chat(client, base, stream=True)]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces).strip() == chat(client, base).choices[0].message.content


def test_completions_and_stop(server):
    client, _, _ = server
    full = client.completions.create(model="pirate", prompt="One, two, three,", max_tokens=8, temperature=0)
    text = full.choices[0].text
    assert text and full.choices[0].finish_reason == "length"
    stop = text.strip().split()[1]
    cut = client.completions.create(model="pirate", prompt="One, two, three,", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    streamed = client.completions.create(model="pirate", prompt="One, two, three,", max_tokens=8, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed).strip() == cut.choices[0].text


def test_seeded_sampling_repeats(server):
    client, _, _ = server
    first, second = (chat(client, "poet", temperature=1.0, seed=7).choices[0].message.content for _ in range(2))
    assert first == second


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    import httpx

    client, url, log = server
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, "no-such-model")
    assert missing.value.body["code"] == "model_not_found" and "pirate" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as hot:
        chat(client, "pirate", temperature=5)
    assert "temperature" in hot.value.body["message"] and hot.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="pirate", messages=[])
    with pytest.raises(openai.BadRequestError) as last:
        client.chat.completions.create(model="pirate", messages=[{"role": "assistant", "content": "Hi"}])
    assert "last message must be the user's" in last.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=url, api_key="wrong", max_retries=0), "pirate")
    raw = httpx.post(f"{url}/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["message"] == "Invalid request: the body is not valid JSON"
    unknown = httpx.get(f"{url}/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert chat(client, "pirate").choices[0].message.content  # still serving
    assert "Traceback" not in log.read_text()
