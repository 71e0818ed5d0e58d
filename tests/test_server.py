"""The OpenAI-compatible server (Part III) through the real `openai` client, on one CPU process and on four
(TP=2 x EP=2): whole and streamed responses, many requests at once, the offline API's tokens, bad requests
answered with OpenAI's error body while serving goes on, a client that leaves mid-stream, a clean stop; and
scripts/bench_serving.py against the one-rank server."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 1], [2, 7, 1, 8, 2, 8], [4, 4, 4], [250, 17], [99] * 20]
MAX_TOKENS = [3, 9, 5, 12, 7, 4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def from_scripts(module: str, name: str):
    "A name from one of scripts/ (they import each other by bare module name, as scripts do)."
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return getattr(__import__(module), name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


class Server:
    "scripts/serve.py in the background (torchrun for several ranks); every process it started is tracked."

    def __init__(self, checkpoint, nproc: int, *args: str):
        self.port, self.tag = free_port(), uuid.uuid4().hex
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MINISGL_TEST_TAG": self.tag,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        launcher = ([sys.executable] if nproc == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
        self.proc = subprocess.Popen([*launcher, str(ROOT / "scripts" / "serve.py"), "--model_path", str(checkpoint),
                                      "--device", "cpu", "--port", str(self.port), *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not come up in 120 s")

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def stop(self) -> tuple[int, str]:
        "SIGTERM, as torchrun or a process manager sends it; every process must be gone within seconds."
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not stop within 20 s of SIGTERM")
        deadline = time.monotonic() + 10
        while (left := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in left:
            p.kill()
        assert not left, f"processes left behind: {[p.pid for p in left]}"
        return self.proc.returncode, err

    def _leftovers(self):
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("MINISGL_TEST_TAG") == self.tag:
                    found.append(p)
            except (psutil.Error, OSError):
                pass
        return found


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    "The offline API's greedy tokens for the same prompts (the server must give the same)."
    from minisgl.llm import LLM
    from minisgl.sampling import SamplingParams
    llm = LLM(str(tiny_checkpoint), device="cpu", ignore_eos=True)
    return [o.output_ids for o in llm.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_TOKENS])]


def completion_ids(tokenizer_text: str) -> list[int]:
    "The tiny model's tokenizer is bytes: a completion's text is its token ids."
    return list(tokenizer_text.encode("utf-8", errors="surrogateescape"))


def check_serving(server, offline):
    client = server.client()
    # Whole responses, greedy: the offline API's tokens (usage counts them).
    for prompt, n, want in zip(PROMPTS, MAX_TOKENS, offline):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].finish_reason == "length"
    # Many at once, each with its own max_tokens, streamed: each stream's text equals its whole response's.
    async def together():
        a = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        whole = await asyncio.gather(*[a.completions.create(model=server.model, prompt=p, max_tokens=n, temperature=0,
                                                            extra_body={"ignore_eos": True})
                                       for p, n in zip(PROMPTS * 3, MAX_TOKENS * 3)])
        streams = []
        for p, n in zip(PROMPTS, MAX_TOKENS):
            s = await a.completions.create(model=server.model, prompt=p, max_tokens=n, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            streams.append([c async for c in s])
        return whole, streams
    whole, streams = asyncio.run(together())
    assert [r.usage.completion_tokens for r in whole] == MAX_TOKENS * 3
    for chunks, w in zip(streams, whole):
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == w.choices[0].text and chunks[-1].usage.completion_tokens == w.usage.completion_tokens
    # The streamed tokens are the offline ones (bytes model: ids < 256 are the text's bytes).
    stream = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS[0], temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole[0].choices[0].text
    # Chat, through the plain template of a byte-level model.
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4


def check_bad_requests(server):
    client = server.client()
    bad = [dict(model="nope", prompt="x"), dict(model=server.model, prompt="x", temperature=5),
           dict(model=server.model, prompt="x", top_p=0), dict(model=server.model, prompt="x", n=2),
           dict(model=server.model, prompt="x", max_tokens=0), dict(model=server.model, prompt=[999]),
           dict(model=server.model, prompt=list(range(200)) * 3, max_tokens=1),
           dict(model=server.model, prompt="x", max_tokens=600), dict(model=server.model, prompt="")]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**fields)
        body = info.value.body
        assert info.value.status_code == 400 and body["message"] and body["type"] == "invalid_request_error", fields
    # A chat with no max_tokens whose prompt alone fills the context.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x" * 700}])
    assert info.value.body["code"] == "context_length_exceeded"
    raw = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert client.completions.create(model=server.model, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def check_disconnect(server):
    "A client that leaves mid-stream: its request is aborted and its pages come back."
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": server.model, "prompt": [1, 2, 3], "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    all_pages_back = from_scripts("check_serving_faults", "all_pages_back")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all_pages_back(server.health()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the request kept running after its client left: {server.health()}")


@pytest.mark.parametrize("nproc,layout", [(1, []), (4, ["--tp_size", "2", "--ep_size", "2"])], ids=["1-rank", "tp2-ep2"])
def test_server(tiny_checkpoint, offline, nproc, layout):
    server = Server(tiny_checkpoint, nproc, *layout, "--max_seq_len", "512")
    server.model = tiny_checkpoint.name
    try:
        models = server.client().models.list()
        assert [m.id for m in models.data] == [server.model]
        check_serving(server, offline)
        check_bad_requests(server)
        check_disconnect(server)
    finally:
        code, err = server.stop()
    # No traceback from the server's own code (torchrun reports the signal it passed on in its own words).
    assert not re.search(r'File ".*(minisgl|serve\.py)', err), err[-3000:]


def test_bench_serving(tiny_checkpoint, tmp_path):
    "The load generator against the one-rank server: every request answered, every percentile reported."
    random_workload = from_scripts("bench_common", "random_workload")
    options = ["--workload", "random", "--requests", "8", "--min_len", "4", "--max_len", "12", "--vocab", "256",
               "--request_rate", "50", "--seed", "3"]
    server = Server(tiny_checkpoint, 1, "--max_seq_len", "512")
    try:
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_serving.py"), "--base_url", server.url,
                              "--model", tiny_checkpoint.name, *options, "--out", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    [path] = tmp_path.glob("serving_random_*.json")
    report = json.loads(path.read_text())
    assert report["requests"] == 8 and report["failed"] == 0 and report["errors"] == []
    # With ignore_eos every request generates its max_tokens: the workload the script drew, seed for seed.
    requests = random_workload(8, vocab=256, min_len=4, max_len=12, seed=3)
    assert report["output_tokens"] == sum(n for _, n in requests)
    assert report["prompt_tokens"] == sum(len(p) for p, _ in requests)
    for metric in ("time_to_first_token_seconds", "time_per_output_token_seconds", "inter_token_latency_seconds"):
        p = report[metric]
        assert 0 <= p["p50"] <= p["p90"] <= p["p99"], (metric, p)


def test_text_stream_deltas_join_to_the_whole_text():
    """Streamed deltas, whatever the chunking of the tokens, join to the whole output's text cut before its
    first stop string; multi-byte characters are never split, and the whole-response path agrees."""
    import random

    from minisgl.server.app import _TextStream
    from minisgl.tokenizer import ByteTokenizer

    tokenizer, rng = ByteTokenizer(), random.Random(0)
    pieces = ["a", "b", " ", "\n", "é", "€", "😀", "END", "EN", "stop"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        stop = tuple(rng.sample(["END", "stop", "€b", "x"], rng.randint(0, 2)))
        ids = tokenizer.encode(text)
        hits = [text.find(s) for s in stop if s in text]
        expected = text[:min(hits)] if hits else text
        stream, deltas, i = _TextStream(tokenizer, stop), [], 0
        while i < len(ids):
            n = rng.randint(1, 3)
            deltas.append(stream.delta(ids[i:i + n], final=i + n >= len(ids)))
            i += n
        assert "".join(deltas) == expected, (text, stop, deltas)
        assert all("\ufffd" not in d for d in deltas), deltas
        whole = _TextStream(tokenizer, stop)
        whole.ids += ids
        assert whole.delta([], final=True) == expected


def test_fault_mix_leaves_the_server_up_and_every_page_free(tiny_checkpoint, tmp_path):
    """scripts/check_serving_faults.py for a few seconds against the one-rank server: valid requests of three
    kinds, clients hanging up mid-stream, four kinds of bad request; every answer checked, the server up
    after it, and every page back."""
    server = Server(tiny_checkpoint, 1, "--max_seq_len", "256")
    try:
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_serving_faults.py"), "--base_url",
                              server.url, "--seconds", "8", "--concurrency", "6", "--max_prompt", "48",
                              "--max_tokens", "24", "--vocab", "320", "--settle_seconds", "20", "--out",
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert server.health()["status"] == "ok"
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    [path] = tmp_path.glob("faults_*.json")
    report = json.loads(path.read_text())
    kinds = ("stream", "whole", "chat", "disconnect", "bad_json", "unknown_model", "bad_value", "too_long")
    assert all(report["counts"].get(kind, 0) > 0 for kind in kinds), report["counts"]
    assert report["server_up"] and report["all_pages_back"] and not report["failures"]


def test_finished_requests_leave_every_ranks_books():
    """The serving loop reports tokens from a replica's first rank only, but every rank must forget its
    finished requests, or ranks other than the first keep every request they ever served."""
    from types import SimpleNamespace

    from minisgl.runtime.request import Request
    from minisgl.sampling import SamplingParams
    from minisgl.server.frontend import _updates

    def replica():
        done, running = Request(0, [1, 2], SamplingParams()), Request(1, [3], SamplingParams())
        done.output_ids, done.status, done.finish_reason = [5, 6], "finished", "length"
        running.output_ids, running.status = [7], "running"
        return SimpleNamespace(engine=SimpleNamespace(requests={0: done, 1: running}))

    first, other = replica(), replica()
    updates = _updates(first, {}, report=True)
    assert [(u.request_id, u.new_ids, u.finish_reason) for u in updates] == [(0, [5, 6], "length"), (1, [7], None)]
    assert _updates(other, {}, report=False) == []
    assert list(first.engine.requests) == list(other.engine.requests) == [1]
