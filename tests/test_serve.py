"""`allocmoe serve`: transformers' OpenAI-compatible server with a plan applied, on 127.0.0.1.

Every server here listens on a free local port, answers a bounded number of requests and is stopped by the
test (background thread, or a child process that is terminated). Requests use the `openai` client, raw HTTP
for malformed bodies and disconnects, and `curl` for the README example.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import allocmoe  # noqa: E402
from allocmoe.serving import HEADER, SERVER_HEADER, BackgroundServer  # noqa: E402
from allocmoe.testing import invoke_cli  # noqa: E402

PROMPTS = ["It is a truth", "hello world", "abc", "The quick brown fox jumps"]
N_NEW = 8
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny DeepSeek-V2 model saved as a Hugging Face directory, loaded back with its tokenizer."""
    d = tiny_dir("deepseek_v2")
    m, tok, _ = allocmoe.load_model(d)
    return d, m, tok


def reference(m, tok, prompts, n=N_NEW):
    """The unpatched model's greedy continuation of each prompt (text of the new tokens)."""
    assert allocmoe.applied_plan(m) is None
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            seq = m.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="-", max_retries=0, timeout=60)


def complete(c, srv, prompt, n=N_NEW, **kw):
    return c.completions.create(model=srv.model_name, prompt=prompt, max_tokens=n, temperature=0, **kw)


def post(url, body: bytes, timeout=30):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def half_plan(m, policy="fixed"):
    return allocmoe.allocate(m, budget=0.5, method="uniform", token_policy=policy)


# --------------------------------------------------------------------------------------------------


def test_full_plan_greedy_equals_unpatched_generate_under_concurrency(tiny):
    _, m, tok = tiny
    ref = reference(m, tok, PROMPTS)
    with BackgroundServer(m, tok, allocmoe.full_plan(m)) as srv:
        c = client(srv)
        assert [x.id for x in c.models.list().data] == [srv.model_name]
        with ThreadPoolExecutor(4) as pool:  # concurrent clients
            got = list(pool.map(lambda p: complete(c, srv, p), PROMPTS))
        assert [r.choices[0].text for r in got] == ref
        full = sum(l.top_k for l in allocmoe.find_moe_layers(m))
        assert all(r.usage.activations_per_token == full for r in got)
        # streaming gives the same text, and the usage in the last chunk
        chunks = list(complete(c, srv, PROMPTS[0], stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == ref[0]
        assert chunks[-1].usage.activations_per_token == full
        # chat completions (the tokenizer has no chat template: a plain "Role: content" one is used)
        r = c.chat.completions.create(model=srv.model_name, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=4, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4
    assert allocmoe.applied_plan(m) is None  # the server removed its plan


@pytest.mark.parametrize("policy", ["fixed", "global"])
def test_half_plan_reports_measured_activations(tiny, policy):
    _, m, tok = tiny
    plan = half_plan(m, policy)
    budget = sum(plan.ks)
    assert budget < plan.budget["original_activations_per_token"]
    with BackgroundServer(m, tok, plan) as srv:
        c = client(srv)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: complete(c, srv, p), PROMPTS[:3]))
        for r, p in zip(got, PROMPTS):
            u = r.usage
            # fixed: every token K_l per layer; global: the tokens of each call share K_l x T
            assert u.activations_per_token == pytest.approx(budget) and u.activations_scope == "request"
            assert u.routed_tokens == len(tok(p)["input_ids"]) + r.usage.completion_tokens - 1
        assert got[0].usage.server_activations_per_token == pytest.approx(budget)
        chunks = list(complete(c, srv, PROMPTS[3], stream=True))
        assert chunks[-1].usage.activations_per_token == pytest.approx(budget)
        status, headers, _ = post(srv.base_url + "/completions", json.dumps(
            {"model": srv.model_name, "prompt": "abc", "max_tokens": 3}).encode())
        assert status == 200 and float(headers[HEADER]) == pytest.approx(budget)
        assert float(headers[SERVER_HEADER]) == pytest.approx(budget)


def test_malformed_requests_get_4xx_and_disconnects_do_not_kill_the_server(tiny):
    _, m, tok = tiny
    with BackgroundServer(m, tok) as srv:
        url, name = srv.base_url, srv.model_name
        bad = [
            ("/completions", b"{not json"),
            ("/completions", b"[1, 2]"),
            ("/completions", json.dumps({"model": name, "prompt": 3}).encode()),
            ("/completions", json.dumps({"model": name, "prompt": "a", "max_tokens": "many"}).encode()),
            ("/completions", json.dumps({"model": name, "prompt": "a", "max_tokens": -1}).encode()),
            ("/completions", json.dumps({"model": name, "prompt": "a", "no_such_field": 1}).encode()),
            ("/completions", json.dumps({"model": "another/model", "prompt": "a"}).encode()),
            ("/chat/completions", json.dumps({"model": name}).encode()),
            ("/chat/completions", json.dumps({"model": name, "messages": "hi"}).encode()),
        ]
        for path, body in bad:
            status, _, text = post(url + path, body)
            assert 400 <= status < 500, (path, body, status, text)
        # a client that goes away mid-stream: the generation is cancelled, the server keeps serving
        for _ in range(2):
            s = socket.create_connection((srv.host, srv.port), timeout=30)
            body = json.dumps({"model": name, "prompt": "It is", "max_tokens": 100, "stream": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"200 OK" in s.recv(4096)
            s.close()
        t0 = time.monotonic()
        r = complete(client(srv), srv, "abc")
        assert r.choices[0].finish_reason in ("length", "stop") and time.monotonic() - t0 < 30
        assert post(url.rsplit("/v1", 1)[0] + "/health", b"")[0] in (200, 405)


@pytest.mark.parametrize("source", ["tiny", "builtin:qwen3-moe"])
def test_continuous_batching_packs_requests_and_counts_only_real_tokens(tiny_dir, source):
    """transformers' continuous batching (qwen3_moe: DeepSeek-V2's latent KV does not fit its paged cache), on a
    tiny model and on the second built-in model (issue 20: served with concurrent clients)."""
    m, tok, _ = allocmoe.load_model(tiny_dir("qwen3_moe") if source == "tiny" else source)
    n = 24  # long enough that the four requests overlap even on a loaded machine
    ref = reference(m, tok, PROMPTS, n)
    seqs_per_call = []
    hook = m.register_forward_pre_hook(
        lambda mod, a, kw: seqs_per_call.append(len(kw["cu_seq_lens_q"]) - 1) if "cu_seq_lens_q" in kw else None,
        with_kwargs=True)
    for plan in (allocmoe.full_plan(m), half_plan(m)):
        with BackgroundServer(m, tok, plan, continuous_batching=True) as srv:
            c = client(srv)
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda p: complete(c, srv, p, n), PROMPTS))
            u = got[0].usage
            assert u.activations_scope == "batch"
            assert all(r.usage.activations_per_token == pytest.approx(sum(plan.ks)) for r in got)
            if plan.method == "full":
                assert [r.choices[0].text for r in got] == ref
            # every token counted is a real query token of some request: no padding, no KV slots
            routed = srv.handle.counts()["cumulative"]["tokens"]
            assert routed == sum(len(tok(p)["input_ids"]) + r.usage.completion_tokens - 1
                                 for p, r in zip(PROMPTS, got))
    hook.remove()
    assert max(seqs_per_call) > 1  # concurrent requests did share forward calls


def test_packed_batch_padding_takes_no_budget(models):
    """Query padding after cu_seq_lens_q[-1] (static shapes under CUDA graphs / compile) is not a real token."""
    m = models["qwen3_moe"]
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 3, 5, 5, 5])  # two requests (3 + 2 tokens), then 3 padded query slots
    with allocmoe.apply(m, half_plan(m, "global")) as h, torch.no_grad():
        m(ids, cu_seq_lens_q=cu)
        c = h.counts()["last"]
    assert c["tokens"] == 5 and sum(c["pairs_per_layer"]) == 5 * sum(h.plan.ks)


def test_continuous_batching_refused_for_latent_attention(tiny):
    _, m, tok = tiny
    with pytest.raises(allocmoe.SettingsError, match="multi-head latent attention"):
        BackgroundServer(m, tok, continuous_batching=True)
    assert allocmoe.applied_plan(m) is None


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if "error" in l.lower() or "Traceback" in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_errors_are_one_line(tiny, tiny_dir, tmp_path):
    d, m, _ = tiny
    rc, _, err = invoke_cli("serve", "--model", d, "--plan", tmp_path / "missing.json", "--port", "0")
    assert rc == 2 and "missing.json" in one_error_line(err)
    other = tiny_dir("qwen3_moe")
    plan = tmp_path / "other_plan.json"
    assert invoke_cli("allocate", "--model", other, "--method", "uniform", "--budget", "0.5", "--out", plan)[0] == 0
    rc, _, err = invoke_cli("serve", "--model", d, "--plan", plan, "--port", "0")
    assert rc == 2 and "another model" in one_error_line(err) and "Loading weights" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        rc, _, err = invoke_cli("serve", "--model", d, "--port", s.getsockname()[1])
    assert rc == 2 and "cannot listen on 127.0.0.1" in one_error_line(err)


def _readme_curl() -> str:
    block = README.read_text().split("## Serve", 1)[1].split("\n## ", 1)[0]
    return next(line for line in block.splitlines() if line.startswith("curl "))


def test_serve_command_answers_the_readme_curl_example(tiny, tmp_path):
    d, m, _ = tiny
    plan = tmp_path / "plan.json"
    half_plan(m).save(plan)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "allocmoe.cli", "serve", "--model", d, "--plan", plan, "--port", str(port),
           "--served-model-name", "allocmoe/default", "--threads", "1"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        curl = _readme_curl().replace("8000", str(port))
        body = re.search(r"-d '(.*)'", curl).group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                if shutil.which("curl"):
                    r = subprocess.run(["bash", "-c", curl + " --fail-with-body"], capture_output=True, text=True,
                                       timeout=60)
                    if r.returncode == 0:
                        reply = json.loads(r.stdout)
                        break
                else:
                    status, _, text = post(f"http://127.0.0.1:{port}/v1/completions", body.encode())
                    if status == 200:
                        reply = json.loads(text)
                        break
            except (OSError, urllib.error.URLError):
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not answer in 60 s"
            time.sleep(0.3)
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == json.loads(body)["max_tokens"]
        assert reply["usage"]["activations_per_token"] == pytest.approx(sum(allocmoe.Plan.load(plan).ks))
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
