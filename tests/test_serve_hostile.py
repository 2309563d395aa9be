"""`allocmoe serve` under hostile requests (issue 22): each gets a 4xx naming the field (or is bounded), never a
traceback, a hang or a silent wrong result, and the server answers a normal request right after it.

One server per module (the tiny DeepSeek-V2 model, a 50% plan) on 127.0.0.1; every request has a timeout;
a module-wide log handler fails the module if any record carries a traceback. The time limit, admission and
shutdown cases use their own small servers (a background thread, or an `allocmoe serve` child process that is
stopped by the test).
"""

import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("pydantic")

import allocmoe  # noqa: E402
from allocmoe.serving import BackgroundServer, ServeLimits  # noqa: E402

CONTEXT = 128  # the tiny models' max_position_embeddings
TIMEOUT = 30


class TracebackCatcher(logging.Handler):
    """Records every log record carrying a traceback. `attach()` after a server is built: uvicorn's log config
    (applied per server) replaces its loggers' handlers; transformers' logger does not propagate."""

    LOGGERS = ("", "transformers", "uvicorn", "uvicorn.error", "asyncio")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(record)

    def attach(self):
        for name in self.LOGGERS:
            if self not in logging.getLogger(name).handlers:
                logging.getLogger(name).addHandler(self)
        return self

    def detach(self):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


@pytest.fixture(scope="module")
def model(tiny_dir):
    m, tok, _ = allocmoe.load_model(tiny_dir("deepseek_v2"))
    return m, tok


@pytest.fixture(scope="module")
def slow(model):
    """Seconds each forward call sleeps (0 unless a test asks): makes a generation long enough to interrupt."""
    delay = {"s": 0.0}
    hook = model[0].register_forward_pre_hook(lambda *a: time.sleep(delay["s"]) if delay["s"] else None)
    yield delay
    hook.remove()


@pytest.fixture(scope="module")
def srv(model, slow):
    m, tok = model
    catcher = TracebackCatcher()
    plan = allocmoe.allocate(m, budget=0.5, method="uniform")
    try:
        with BackgroundServer(m, tok, plan) as s:
            s.catcher = catcher.attach()
            yield s
    finally:
        catcher.detach()
    assert not catcher.records, [r.getMessage() for r in catcher.records]
    assert allocmoe.applied_plan(m) is None


def post(srv, path, body, timeout=TIMEOUT, headers=None):
    """(status, parsed JSON or text) of one POST to the server."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        conn.request("POST", "/v1" + path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        text = r.read().decode()
    finally:
        conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def normal(srv, **kw):
    """A normal request right after a hostile one: answered at once, with text."""
    t0 = time.monotonic()
    status, out = post(srv, "/completions", {"model": srv.model_name, "prompt": "It is", "max_tokens": 3,
                                             "temperature": 0, **kw})
    assert status == 200 and out["choices"][0]["text"] is not None, out
    assert time.monotonic() - t0 < 10
    return out


C, CH = "/completions", "/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG = "It is a truth universally acknowledged. " * 10  # 400 characters: 400 tokens > the context of 128

# (id, path, body, status, the field the error must name)
HOSTILE = [
    ("max_tokens_1e9", C, {"prompt": "abc", "max_tokens": 1_000_000_000}, 400, "max_tokens"),
    ("max_tokens_1e9_stream", C, {"prompt": "abc", "max_tokens": 1_000_000_000, "stream": True}, 400, "max_tokens"),
    ("max_tokens_past_context", C, {"prompt": "abc", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max_tokens_zero", C, {"prompt": "abc", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens_string", C, {"prompt": "abc", "max_tokens": "many"}, 400, "max_tokens"),
    ("max_tokens_bool", C, {"prompt": "abc", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens_float", C, {"prompt": "abc", "max_tokens": 4.5}, 400, "max_tokens"),
    ("chat_max_completion_tokens_1e9", CH, {"messages": MSG, "max_completion_tokens": 10 ** 9}, 400,
     "max_completion_tokens"),
    ("chat_max_tokens_1e9", CH, {"messages": MSG, "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("prompt_missing", C, {"max_tokens": 3}, 400, "prompt"),
    ("prompt_empty", C, {"prompt": "", "max_tokens": 3}, 400, "prompt"),
    ("prompt_number", C, {"prompt": 3}, 400, "prompt"),
    ("prompt_list", C, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt_token_ids", C, {"prompt": [1, 2, 3]}, 400, "prompt"),
    ("prompt_past_context", C, {"prompt": LONG, "max_tokens": 3}, 400, "prompt"),
    ("prompt_past_context_stream", C, {"prompt": LONG, "max_tokens": 3, "stream": True}, 400, "prompt"),
    ("chat_past_context", CH, {"messages": [{"role": "user", "content": LONG}], "max_tokens": 3}, 400, "messages"),
    ("stop_number", C, {"prompt": "abc", "stop": 5}, 400, "stop"),
    ("stop_five_strings", C, {"prompt": "abc", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop_empty_string", C, {"prompt": "abc", "stop": ""}, 400, "stop"),
    ("chat_stop_list_of_numbers", CH, {"messages": MSG, "stop": [1, 2]}, 400, "stop"),
    ("seed_string", C, {"prompt": "abc", "seed": "x"}, 400, "seed"),
    ("seed_too_big", C, {"prompt": "abc", "seed": 2 ** 70}, 400, "seed"),
    ("generation_config_not_json", C, {"prompt": "abc", "generation_config": "{oops"}, 400, "generation_config"),
    ("generation_config_object", C, {"prompt": "abc", "generation_config": {"max_new_tokens": 3}}, 400,
     "generation_config"),
    ("generation_config_list", C, {"prompt": "abc", "generation_config": "[1, 2]"}, 400, "generation_config"),
    ("generation_config_unknown_key", C, {"prompt": "abc", "generation_config": '{"no_such": 1}'}, 400,
     "generation_config"),
    ("generation_config_negative", C, {"prompt": "abc", "generation_config": '{"max_new_tokens": -5}'}, 400,
     "generation_config"),
    ("generation_config_beams", C, {"prompt": "abc", "generation_config": '{"num_beams": 64}'}, 400,
     "generation_config"),
    ("generation_config_1e9", C, {"prompt": "abc", "generation_config": '{"max_new_tokens": 1000000000}'}, 400,
     "generation_config"),
    ("temperature_negative", C, {"prompt": "abc", "temperature": -1}, 400, "temperature"),
    ("temperature_huge", C, {"prompt": "abc", "temperature": 50}, 400, "temperature"),
    ("temperature_string", C, {"prompt": "abc", "temperature": "hot"}, 400, "temperature"),
    ("top_p_5", C, {"prompt": "abc", "top_p": 5}, 400, "top_p"),
    ("top_p_negative", CH, {"messages": MSG, "top_p": -0.5}, 400, "top_p"),
    ("n_3", C, {"prompt": "abc", "n": 3}, 400, "n"),
    ("chat_n_3", CH, {"messages": MSG, "n": 3}, 400, "n"),
    ("frequency_penalty_minus_1_5", C, {"prompt": "abc", "frequency_penalty": -1.5}, 400, "frequency_penalty"),
    ("presence_penalty_ignored", C, {"prompt": "abc", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("echo_ignored", C, {"prompt": "abc", "echo": True}, 400, "echo"),
    ("best_of_ignored", C, {"prompt": "abc", "best_of": 3}, 400, "best_of"),
    ("logprobs_ignored", C, {"prompt": "abc", "logprobs": 5}, 400, "logprobs"),
    ("chat_logprobs_ignored", CH, {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("chat_response_format_ignored", CH, {"messages": MSG, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("chat_messages_missing", CH, {"max_tokens": 3}, 400, "messages"),
    ("chat_messages_empty", CH, {"messages": []}, 400, "messages"),
    ("chat_messages_string", CH, {"messages": "hi"}, 400, "messages"),
    ("chat_role_unknown", CH, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat_content_number", CH, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("chat_content_image", CH, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}, 400, "messages.0.content"),
    ("chat_tool_call_bad_arguments", CH, {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
     "messages.0.tool_calls"),
    ("chat_logit_bias_bad_token", CH, {"messages": MSG, "logit_bias": {"999999": 5}}, 400, "logit_bias"),
    ("chat_logit_bias_out_of_range", CH, {"messages": MSG, "logit_bias": {"5": 500}}, 400, "logit_bias.5"),
    ("chat_template_kwargs_reserved", CH, {"messages": MSG, "chat_template_kwargs": {"tokenize": False}}, 400,
     "chat_template_kwargs"),
    ("chat_tools_malformed", CH, {"messages": MSG, "tools": [{"type": "function", "function": {}}]}, 400,
     "tools.0.function"),
    ("stream_string", C, {"prompt": "abc", "stream": "yes"}, 400, "stream"),
    ("model_number", C, {"prompt": "abc", "model": 5}, 400, "model"),
]


@pytest.mark.parametrize("path,body,status,param", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_field_gets_4xx_naming_it_then_a_normal_request_works(srv, path, body, status, param):
    t0 = time.monotonic()
    got, out = post(srv, path, {"model": srv.model_name, **body})
    assert got == status, out
    assert time.monotonic() - t0 < 10  # refused before any long generation
    err = out["error"]
    assert err["param"] == param and err["message"].startswith(param.split(".")[0]), err
    assert err["type"] == "invalid_request_error" and "Traceback" not in err["message"]
    normal(srv)


def test_malformed_bodies_and_unknown_fields_get_4xx(srv):
    for body in (b"{not json", b"[1, 2]", b"", b"\xff\xfe"):
        assert 400 <= post(srv, C, body)[0] < 500, body
    status, out = post(srv, C, {"model": srv.model_name, "prompt": "abc", "no_such_field": 1})
    assert status == 422 and "no_such_field" in json.dumps(out)
    assert post(srv, C, {"model": "another/model", "prompt": "abc"})[0] == 400
    normal(srv)


def test_body_over_the_limit_gets_413_without_being_kept(srv, monkeypatch):
    from allocmoe.serving.limits import LimitsMiddleware

    limit = srv.limits.max_body_bytes
    # a 10 MB prompt sent by an ordinary client: it gets to read the 413 (the body is dropped, never kept)
    t0 = time.monotonic()
    status, out = post(srv, C, json.dumps({"model": srv.model_name, "prompt": "a" * (10 * 2 ** 20)}).encode())
    assert status == 413 and "max-body-bytes" in out["error"]["message"] and time.monotonic() - t0 < 10
    # a client that announces 10 MB and stalls is answered without waiting for the rest
    monkeypatch.setattr(LimitsMiddleware, "DRAIN_SECONDS", 1.0)
    t0 = time.monotonic()
    s = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    try:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {10 * 2 ** 20}\r\n\r\n".encode() + b'{"prompt": "' + b"a" * 65536)
        head = s.recv(65536).decode()
    finally:
        s.close()
    assert head.startswith("HTTP/1.1 413") and time.monotonic() - t0 < 5, head
    # the same without Content-Length (chunked): refused once the limit is passed
    s = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"a" * 65536
        for _ in range(limit // len(piece) + 2):
            s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        head = s.recv(65536).decode()
    finally:
        s.close()
    assert head.startswith("HTTP/1.1 413"), head
    # just under the limit is read and judged on its content (a 400 on the prompt's length, not a 413)
    status, out = post(srv, C, {"model": srv.model_name, "prompt": "a" * (limit - 200), "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "prompt"
    normal(srv)


def test_endpoints_allocmoe_does_not_serve_get_404(srv):
    for path in ("/responses", "/systemone", "/audio/transcriptions"):
        assert post(srv, path, {"model": srv.model_name, "input": "hi", "max_output_tokens": 10 ** 9})[0] == 404
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=TIMEOUT)
    conn.request("POST", "/reset")
    assert conn.getresponse().status == 404
    conn.close()
    normal(srv)


def test_default_max_tokens_fits_the_context(srv):
    out = normal(srv, max_tokens=None, prompt="x" * (CONTEXT - 10))
    assert out["usage"]["completion_tokens"] <= 10  # not the stock 1024 past a 128-token context
    out = normal(srv, max_tokens=None)
    assert out["usage"]["completion_tokens"] <= min(srv.limits.default_max_tokens, CONTEXT)


def test_temperature_samples_and_seed_reproduces(srv):
    body = {"model": srv.model_name, "prompt": "It is", "max_tokens": 16, "temperature": 1.5}
    texts = [post(srv, C, body)[1]["choices"][0]["text"] for _ in range(4)]
    assert len(set(texts)) > 1, texts  # sampled (the model's generation config has no do_sample)
    seeded = [post(srv, C, {**body, "seed": 7})[1]["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]
    greedy = [post(srv, C, {**body, "temperature": 0})[1]["choices"][0]["text"] for _ in range(2)]
    assert greedy[0] == greedy[1]
    chat = post(srv, CH, {"model": srv.model_name, "messages": MSG, "max_tokens": 4, "temperature": 1.0, "seed": 3})
    assert chat[0] == 200 and chat[1]["choices"][0]["message"]["role"] == "assistant"


def _forward_counter(m):
    calls = []
    return calls, m.register_forward_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stops_when_its_client_disconnects(srv, model, slow, stream):
    calls, hook = _forward_counter(model[0])
    slow["s"] = 0.03  # 120 tokens would take 3.6 s
    try:
        body = json.dumps({"model": srv.model_name, "prompt": "It is", "max_tokens": 120, "stream": stream,
                           "temperature": 0}).encode()
        s = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
        s.close()
        registry = srv.app.state.allocmoe_registry
        assert registry.wait_idle(5.0)
        t0 = time.monotonic()
        normal(srv)
        assert time.monotonic() - t0 < 3
    finally:
        slow["s"] = 0.0
        hook.remove()
    assert len(calls) < 100, len(calls)  # the abandoned generation stopped long before its 120 tokens


def test_time_limit_stops_a_long_generation_and_says_so(srv, model, slow):
    m, tok = model
    slow["s"] = 0.02
    try:
        with BackgroundServer(m, tok, handle=srv.handle, limits=ServeLimits(request_timeout=0.5)) as s:
            srv.catcher.attach()
            t0 = time.monotonic()
            status, out = post(s, C, {"model": s.model_name, "prompt": "It is", "max_tokens": 120})
            assert status == 200 and time.monotonic() - t0 < 5
            assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["stopped_by"] == "time_limit"
            assert out["usage"]["completion_tokens"] < 120
            # streaming: the final chunk says the same
            conn = http.client.HTTPConnection(s.host, s.port, timeout=TIMEOUT)
            conn.request("POST", "/v1/completions", json.dumps(
                {"model": s.model_name, "prompt": "It is", "max_tokens": 120, "stream": True}),
                {"Content-Type": "application/json"})
            events = [e for e in conn.getresponse().read().decode().split("\n\n") if e.startswith("data: {")]
            conn.close()
            last = json.loads(events[-1][6:])
            assert last["usage"]["stopped_by"] == "time_limit" and last["choices"][0]["finish_reason"] == "length"
            slow["s"] = 0.0
            assert post(s, C, {"model": s.model_name, "prompt": "abc", "max_tokens": 3})[0] == 200
    finally:
        slow["s"] = 0.0


def test_requests_over_the_concurrency_limit_get_503(srv, model, slow):
    m, tok = model
    slow["s"] = 0.02
    try:
        with BackgroundServer(m, tok, handle=srv.handle, limits=ServeLimits(max_concurrent_requests=1)) as s:
            srv.catcher.attach()
            results = []
            t = threading.Thread(target=lambda: results.append(
                post(s, C, {"model": s.model_name, "prompt": "It is", "max_tokens": 60})))
            t.start()
            deadline = time.monotonic() + 5
            while not s.app.state.allocmoe_registry.in_flight() and time.monotonic() < deadline:
                time.sleep(0.01)
            status, out = post(s, C, {"model": s.model_name, "prompt": "abc", "max_tokens": 2})
            assert status == 503 and "max-concurrent-requests" in out["error"]["message"]
            t.join(TIMEOUT)
            assert results and results[0][0] == 200
            slow["s"] = 0.0
            assert post(s, C, {"model": s.model_name, "prompt": "abc", "max_tokens": 2})[0] == 200
    finally:
        slow["s"] = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_and_exits_within_seconds(tiny_dir, sig):
    """A generation that would run for minutes (the context raised past the model's own) is stopped at the end
    of the drain; the process exits in seconds."""
    port = _free_port()
    # what `allocmoe serve --model M --port P --threads 1 --max-context 100000 --drain-timeout 1` runs
    code = ("import sys; from allocmoe.serving import ServeSettings, serve; "
            "serve(ServeSettings(model=sys.argv[1], port=int(sys.argv[2]), threads=1, max_context=100000, "
            "drain_timeout=1.0), log=lambda s: print(s, file=sys.stderr))")
    cmd = [sys.executable, "-c", code, tiny_dir("deepseek_v2"), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not start in 60 s"
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"model": tiny_dir("deepseek_v2"), "prompt": "It is", "max_tokens": 90000,
                           "stream": True, "temperature": 0}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 3:  # streaming has begun
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(15)
        assert time.monotonic() - t0 < 10
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "Traceback" not in err, err


def test_limit_defaults_are_stated_in_help_and_readme():
    from pathlib import Path

    from allocmoe.testing import invoke_cli

    rc, out, _ = invoke_cli("serve", "--help")
    assert rc == 0
    flat = " ".join(out.replace("│", " ").split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Serve", 1)[1]
    readme = readme.split("\n## ", 1)[0]
    d = ServeLimits()
    for flag, default in [("--max-body-bytes", d.max_body_bytes), ("--default-max-tokens", d.default_max_tokens),
                          ("--request-timeout", d.request_timeout), ("--drain-timeout", d.drain_timeout),
                          ("--max-concurrent-requests", d.max_concurrent_requests), ("--max-context", None)]:
        assert flag in readme, flag
        if default is not None:
            text = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"`{flag}` ({text}" in readme or f"`{flag}` seconds ({text})" in readme, flag
    for flag in ("--max-body-bytes", "--default-max-tokens", "--request-timeout", "--drain-timeout",
                 "--max-context"):
        assert flag in flat, flag
    assert "[default: 1048576]" in flat and "[default: 256]" in flat and "[default: 120.0]" in flat


def test_sixteen_concurrent_clients_sharing_one_request_id_each_get_their_own_answer(srv):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"{'abcdefgh'[i % 8]} is" for i in range(16)]

    def one(p):
        return post(srv, C, {"model": srv.model_name, "prompt": p, "max_tokens": 4, "temperature": 0},
                    headers={"x-request-id": "same"})

    alone = {p: one(p)[1]["choices"][0]["text"] for p in set(prompts)}
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert all(status == 200 for status, _ in got), got
    assert [out["choices"][0]["text"] for _, out in got] == [alone[p] for p in prompts]
    assert all(out["usage"]["routed_tokens"] == len(p) + out["usage"]["completion_tokens"] - 1
               for p, (_, out) in zip(prompts, got))  # each request's meter holds its own tokens only


def test_continuous_batching_limits(tiny_dir):
    """Under continuous batching: the same context bounds, per-request sampling refused (transformers shares one
    greedy config), and the time limit stops a long generation, streaming or not."""
    m, tok, _ = allocmoe.load_model(tiny_dir("qwen3_moe"))
    delay = {"s": 0.0}
    hook = m.register_forward_pre_hook(lambda *a: time.sleep(delay["s"]) if delay["s"] else None)
    catcher = TracebackCatcher()
    try:
        with BackgroundServer(m, tok, continuous_batching=True, limits=ServeLimits(request_timeout=0.5)) as s:
            catcher.attach()
            for body, param in [({"max_tokens": 10 ** 9}, "max_tokens"), ({"temperature": 1.0}, "temperature"),
                                ({"seed": 1}, "seed"), ({"stop": "x"}, "stop"), ({"prompt": LONG}, "prompt")]:
                status, out = post(s, C, {"model": s.model_name, "prompt": "abc", **body})
                assert status == 400 and out["error"]["param"] == param, out
                assert post(s, C, {"model": s.model_name, "prompt": "abc", "max_tokens": 3})[0] == 200
            delay["s"] = 0.03
            t0 = time.monotonic()
            status, out = post(s, C, {"model": s.model_name, "prompt": "It is", "max_tokens": 100})
            assert status == 504 and out["error"]["type"] == "timeout" and time.monotonic() - t0 < 5
            conn = http.client.HTTPConnection(s.host, s.port, timeout=TIMEOUT)
            conn.request("POST", "/v1/completions", json.dumps(
                {"model": s.model_name, "prompt": "It is", "max_tokens": 100, "stream": True}),
                {"Content-Type": "application/json"})
            events = [e for e in conn.getresponse().read().decode().split("\n\n") if e.startswith("data: {")]
            conn.close()
            assert time.monotonic() - t0 < 10
            last = json.loads(events[-1][6:])
            assert last["usage"]["stopped_by"] == "time_limit" and last["usage"]["completion_tokens"] < 100
            delay["s"] = 0.0
            assert post(s, C, {"model": s.model_name, "prompt": "abc", "max_tokens": 3})[0] == 200
    finally:
        hook.remove()
        catcher.detach()
    assert not catcher.records, [r.getMessage() for r in catcher.records]
