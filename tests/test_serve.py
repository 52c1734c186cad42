"""``moe-local serve`` against the real ``openai`` client: a server process started by the test on a free port.

Answers are checked against the library's own generation in this process (``m.generate`` with the same
adapter), against ``moe-local generate``, and against transformers' ``generate`` with the adapter's gates
set by hand. The models are endless copies of tiny random checkpoints (answers of exactly max-tokens
tokens), with a 1024-token context so that one answer can run long enough to be interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import moe_local
from moe_local.chat import eos_token_ids, prompt_ids

from checkpoints import make_grove, make_qwen3_moe
from helpers import BACKENDS, endless, library_greedy, make_adapter, run_cli, run_main

PROMPT = "What is 3 plus 4?"
MAX = 12
LONG = 900  # tokens: several seconds of generation, to be cut short
CONTEXT = 1024


class Server:
    """``python -m moe_local serve ARGS --port 0`` in a new process; ready once it prints its address."""

    def __init__(self, tmp_path, *args, timeout: float = 180):
        self.log = tmp_path / "server.log"
        # One thread: the server shares the machine's cores with the test process.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "moe_local", "serve", *map(str, args), "--port", "0"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while not (found := re.search(r"at (http://\S+/v1)", self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.url = found.group(1)

    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=timeout)

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of a raw POST: bodies the openai client would never send."""
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def health(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=30) as response:
            return json.loads(response.read())

    def wait_idle(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while (status := self.health()["queue"])["running"] or status["waiting"]:
            assert time.monotonic() < deadline, f"the server is still busy: {status}"
            time.sleep(0.05)
        return status

    def interrupt(self, timeout: float = 60) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the server did not stop on SIGINT:\n{self.log.read_text()}")
        return code, self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.interrupt()


def chat(client, model, max_tokens=MAX, **kwargs):
    messages = [{"role": "user", "content": PROMPT}]
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **kwargs)


def chat_text(client, model, stream=False, max_tokens=MAX) -> str:
    if not stream:
        return chat(client, model, max_tokens, temperature=0).choices[0].message.content
    chunks = chat(client, model, max_tokens, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- fixtures: the model, two adapters, the expected answers and the server ------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model folder, {adapter name: folder}): an endless Qwen3-MoE with a long context, two adapters
    that tune different layers."""
    root = tmp_path_factory.mktemp("serve")
    model = endless(make_qwen3_moe(root / "made", max_position_embeddings=CONTEXT), root / "qwen3")
    adapters = {
        "a1": make_adapter(model, root / "a1", layers=2, seed=1),
        "a2": make_adapter(model, root / "a2", layers=1, scale=2.0, seed=2),
    }
    return model, adapters


@pytest.fixture(scope="module")
def expected(folders):
    """The in-process answers (``m.generate``) of the base and of each adapter to PROMPT, and the model."""
    model, adapters = folders
    out = {"base": moe_local.load(model, backend="torch").generate(PROMPT, max_tokens=MAX)}
    for name, path in adapters.items():
        out[name] = moe_local.load(model, backend="torch", adapter_path=path).generate(PROMPT, max_tokens=MAX)
    assert len(set(out.values())) == 3, "the adapters must change the answer, else swapping proves nothing"
    return out


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    model, adapters = folders
    options = [x for name, path in adapters.items() for x in ("--adapter", f"{name}={path}")]
    running = Server(tmp_path_factory.mktemp("log"), "--model", model, *options, "--backend", "torch")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def base(folders) -> str:
    """The base model's name in requests: the --model value as given."""
    return str(folders[0])


def named(base, name):
    return base if name == "base" else name


# -- endpoints ------------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(server, base):
    assert server.url.startswith("http://127.0.0.1:")  # no --host: loopback only
    models = server.client().models.list().data
    assert [m.id for m in models] == [base, "a1", "a2"]
    assert server.client().models.retrieve("a2").id == "a2"
    health = server.health()
    assert health["status"] == "ok" and health["model"] == base and health["adapters"] == ["a1", "a2"]


def test_chat_plain_and_streamed_equal_generate_and_transformers(server, base, folders, expected):
    client = server.client()
    reply = chat(client, base, temperature=0)
    assert reply.choices[0].message.content == expected["base"]
    assert reply.choices[0].finish_reason == "length"
    m = moe_local.load(folders[0], backend="torch")
    ids = prompt_ids(m, PROMPT)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), MAX)
    assert reply.usage.total_tokens == len(ids) + MAX
    library = library_greedy("torch", folders[0], "qwen3", ids, eos_token_ids(m), MAX)
    assert expected["base"] == m.tokenizer.decode(library, skip_special_tokens=True)

    chunks = list(chat(client, base, temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed piece by piece, not in one block
    assert "".join(pieces) == expected["base"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX and chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_chat_equals_moe_local_generate_with_the_same_adapter(server, folders, expected):
    model, adapters = folders
    result = run_cli("generate", "--model", model, "--adapter-path", adapters["a1"], "--prompt", PROMPT, "-n", MAX)
    assert result.returncode == 0, result.stderr
    assert result.stdout == chat_text(server.client(), "a1", stream=True) + "\n" == expected["a1"] + "\n"


def test_completions_feed_the_prompt_as_given(server, base, folders):
    m = moe_local.load(folders[0], backend="torch")
    raw = m.tokenizer.encode(PROMPT)
    library = library_greedy("torch", folders[0], "qwen3", raw, eos_token_ids(m), MAX)
    want = m.generate(PROMPT, max_tokens=MAX, chat_template=False)
    assert want == m.tokenizer.decode(library, skip_special_tokens=True)
    client = server.client()
    reply = client.completions.create(model=base, prompt=PROMPT, max_tokens=MAX, temperature=0)
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(raw), MAX)
    stream = client.completions.create(model=base, prompt=PROMPT, max_tokens=MAX, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_stop_strings_end_the_answer_before_them(server, base, expected):
    """A stop string taken from inside the known answer: the answer ends right before it, finish 'stop'."""
    text = expected["base"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    reply = chat(server.client(), base, temperature=0, stop=[stop, "never in it"])
    assert reply.choices[0].message.content == text[: text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_generate_with_the_same_seed(server, base, folders):
    m = moe_local.load(folders[0], backend="torch")
    want = m.generate(PROMPT, max_tokens=MAX, temp=1.5, top_p=0.9, seed=7)
    assert want != m.generate(PROMPT, max_tokens=MAX)  # sampled, not greedy
    for _ in range(2):
        reply = chat(server.client(), base, temperature=1.5, top_p=0.9, seed=7)
        assert reply.choices[0].message.content == want


def test_each_request_gets_its_adapter_and_the_base_comes_back(server, base, folders, expected):
    """Adapter and base requests interleaved; each adapter's answer also equals transformers' generate with
    the adapter's gates set into the model by hand."""
    model, adapters = folders
    for name in ["base", "a1", "base", "a2", "a1", "a2", "base"]:
        assert chat_text(server.client(), named(base, name)) == expected[name], name
    m = moe_local.load(model, backend="torch")
    ids = prompt_ids(m, PROMPT)
    for name, path in adapters.items():
        library = library_greedy("torch", model, "qwen3", ids, eos_token_ids(m), MAX, adapter=path)
        assert expected[name] == m.tokenizer.decode(library, skip_special_tokens=True)


def test_eight_concurrent_requests_are_all_answered_with_their_own_adapter(server, base, expected):
    names = ["base", "a1", "a2", "a1", "base", "a2", "a1", "base"]
    before = server.wait_idle()["completed"]  # idle: the last request counted (its client has it before)
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda i: chat_text(server.client(), named(base, names[i]), stream=i % 2), range(8)))
    assert answers == [expected[name] for name in names]
    assert server.health()["queue"]["completed"] == before + 8


# -- bad requests ---------------------------------------------------------------------------------


def body(**fields) -> dict:
    return {"model": "MODEL", "messages": [{"role": "user", "content": PROMPT}], **fields}


TOO_LONG = " ".join(["What is 3 plus 4?"] * CONTEXT)
BAD_BODIES = {
    "malformed JSON": (b'{"model": "x", "messages": [', None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "JSON object"),
    "max_tokens a string": (body(max_tokens="5"), "max_tokens", "integer"),
    "max_tokens a bool": (body(max_tokens=True), "max_tokens", "integer"),
    "max_tokens zero": (body(max_tokens=0), "max_tokens", "greater than 0"),
    "max_tokens negative": (body(max_tokens=-4), "max_tokens", "greater than 0"),
    "temperature a string": (body(temperature="hot"), "temperature", "number"),
    "top_p above 1": (body(top_p=1.5), "top_p", "less than or equal to 1"),
    "messages a string": (body(messages=PROMPT), "messages", "list"),
    "no messages": (body(messages=[]), "messages", "at least 1"),
    "unknown role": (body(messages=[{"role": "robot", "content": "hi"}]), "messages", "user"),
    "stop a number": (body(stop=5), "stop", "string"),
    "empty stop": (body(stop=[""]), "stop", "empty"),
    "seed a float": (body(seed=1.5), "seed", "integer"),
    "seed negative": (body(seed=-1), "seed", "greater than or equal to 0"),
    "model missing": ({"messages": [{"role": "user", "content": PROMPT}]}, "model", "required"),
    "prompt longer than the context": (body(messages=[{"role": "user", "content": TOO_LONG}]), "messages", "context"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_requests_get_400_with_an_openai_error(server, base, case):
    raw, param, words = BAD_BODIES[case]
    data = raw if isinstance(raw, bytes) else json.dumps(raw).replace('"MODEL"', json.dumps(base)).encode()
    status, _, answer = server.post("/chat/completions", data)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_bad_requests_through_the_openai_client_and_the_server_goes_on(server, base, expected):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "no-such-adapter")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, base, max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=base, prompt=TOO_LONG, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    status, _, answer = server.post("/completions", b"{}", content_type="text/plain")
    assert status == 400 and "error" in answer
    assert chat_text(client, base) == expected["base"]


# -- disconnects, a full queue, Ctrl-C ------------------------------------------------------------


def test_a_client_gone_mid_stream_stops_its_generation_and_its_adapter(server, base, expected):
    before = server.wait_idle()  # idle: the last request counted (its client has it before)
    stream = chat(server.client(), "a1", max_tokens=LONG, temperature=0, stream=True)
    for _, chunk in zip(range(4), stream):
        assert chunk.choices
    stream.close()
    after = server.wait_idle()
    # Counted as cancelled only when the worker stopped it before its end; the log says where.
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    stopped = [int(n) for n in re.findall(r"request cancelled after (\d+) generated tokens", server.log.read_text())]
    assert len(stopped) == 1 and stopped[0] < LONG
    assert chat_text(server.client(), base) == expected["base"]
    assert chat_text(server.client(), "a1", stream=True) == expected["a1"]


def test_a_client_that_times_out_on_a_whole_answer_stops_it_too(server, base, expected):
    before = server.wait_idle()  # idle: the last request counted (its client has it before)
    with pytest.raises(openai.APITimeoutError):
        chat(server.client(timeout=1.0), base, max_tokens=LONG, temperature=0)
    after = server.wait_idle()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert chat_text(server.client(), base) == expected["base"]


def test_a_broken_pipe_does_not_end_the_server(server, base, expected):
    """SIGPIPE (a write to a client that has gone) is ignored by the server, unlike by the other commands."""
    server.process.send_signal(signal.SIGPIPE)
    time.sleep(0.5)
    assert server.process.poll() is None
    assert chat_text(server.client(), base) == expected["base"]


@pytest.mark.slow
def test_a_full_queue_answers_503_and_ctrl_c_stops_the_server(folders, tmp_path):
    model = str(folders[0])
    server = Server(tmp_path, "--model", model, "--backend", "torch", "--queue-size", "1")
    try:
        client = server.client()
        running = chat(client, model, max_tokens=LONG, stream=True)
        next(running)  # the role chunk: it is generating
        waiting = chat(client, model, max_tokens=LONG, stream=True)  # headers come at once; it waits
        deadline = time.monotonic() + 60
        while server.health()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, model)
        assert e.value.status_code == 503 and e.value.code == "queue_full"
        assert int(e.value.response.headers["retry-after"]) >= 1

        ended = []
        for stream in (running, waiting):
            threading.Thread(target=lambda s=stream: ended.append(_drain(s)), daemon=True).start()
        code, log = server.interrupt()
    finally:
        server.stop()
    assert code in (0, 130), log
    assert "Traceback" not in log and "moe-local: interrupted" in log
    deadline = time.monotonic() + 10
    while len(ended) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(ended) == ["error", "error"]  # both streams were told, neither hangs


def _drain(stream) -> str:
    try:
        for _ in stream:
            pass
    except (openai.APIError, openai.APIConnectionError):
        return "error"
    return "finished"


# -- the CLI's one-line errors ---------------------------------------------------------------------


def test_bad_adapter_options_are_one_line_errors_before_serving(folders, tmp_path, capsys):
    """In this process: they fail before the port is bound, so the port in use, given as a safety net, is
    never reached (were it reached, the error would name the port instead of hanging the test)."""
    model, adapters = folders
    cases = [
        (["--adapter", "no-equals-sign"], "NAME=PATH"),
        (["--adapter", f"={adapters['a1']}"], "NAME=PATH"),
        (["--adapter", f"a={adapters['a1']}", "--adapter", f"a={adapters['a2']}"], "twice"),
        (["--adapter", f"{model}={adapters['a1']}"], "base model's name"),
        (["--adapter", f"x={tmp_path / 'missing'}"], "not found"),
        (["--adapter", f"x={model}"], "is not a router adapter"),
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for options, words in cases:
            code, out, err = run_main(capsys, "serve", "--model", model, "--port", port, *options)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and words in lines[0], (options, err)


@pytest.mark.slow
def test_an_adapter_made_for_another_model_is_refused_before_serving(folders, olmoe_dir, tmp_path):
    wrong = make_adapter(olmoe_dir, tmp_path / "olmoe-adapter")
    result = run_cli("serve", "--model", folders[0], "--port", 0, "--adapter", f"x={wrong}", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "made for another model" in lines[0], result.stderr


def test_a_port_in_use_is_a_one_line_error(folders):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--model", folders[0], "--port", port, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"moe-local: error: port {port} on 127.0.0.1 is in use (choose another with --port)"
    )


# -- MLX, and GroveMoE ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_grove_on_mlx_serves_adapters_per_request(backend, tmp_path):
    """The MLX backend and the Grove family: plain and streamed answers equal MLX's in-process generate,
    with and without the adapter, and the base answer comes back after an adapter request."""
    model = endless(make_grove(tmp_path / "made"), tmp_path / "grove")
    adapter = make_adapter(model, tmp_path / "grove-adapter")
    want = {
        "base": moe_local.load(model, backend=backend).generate(PROMPT, max_tokens=MAX),
        "tuned": moe_local.load(model, backend=backend, adapter_path=adapter).generate(PROMPT, max_tokens=MAX),
    }
    assert want["base"] != want["tuned"]
    server = Server(tmp_path, "--model", model, "--adapter", f"tuned={adapter}", "--backend", backend)
    try:
        client, base = server.client(), str(model)
        assert chat_text(client, base) == want["base"]
        assert chat_text(client, "tuned", stream=True) == want["tuned"]
        assert chat_text(client, base, stream=True) == want["base"]
        assert chat_text(client, "tuned") == want["tuned"]
        assert server.health()["backend"] == backend
    finally:
        server.stop()


def test_the_core_imports_without_fastapi_and_serve_names_the_extra():
    """``sys.modules[name] = None`` makes a package absent for imports and find_spec alike."""
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
        "import moe_local, moe_local.cli, moe_local.chat, moe_local.tuning.adapter\n"
        "moe_local.cli.main(['serve', '--model', 'tiny'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "moe-local: error: moe-local serve needs fastapi and uvicorn: pip install 'moe-local[serve]'"
    )
