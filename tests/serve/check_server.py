"""Drives a running `recontrol serve` with the official `openai` client (and raw HTTP for the
hostile inputs), checking it against `recontrol generate`'s outputs on the same prompts.

Called by cli/tests/serve.rs with a JSON spec (prompts, cases with the generate outputs) and the
server's pid; exits non-zero on the first failed check, printing which. The last check sends the
server SIGTERM while a request is streaming (graceful shutdown).
"""

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import sys
import time
import urllib.parse

import openai
from openai import AsyncOpenAI, OpenAI


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def log(message):
    print(message, file=sys.stderr, flush=True)


class Server:
    def __init__(self, base, key, model):
        self.base = base
        self.key = key
        self.model = model
        url = urllib.parse.urlparse(base)
        self.host, self.port = url.hostname, url.port
        self.client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        self.aclient = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)

    def raw(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers, parsed JSON or text) of one raw request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        hdrs = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        hdrs.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data.decode(errors="replace")
        return resp.status, dict(resp.getheaders()), parsed

    def metric(self, name):
        _, _, text = self.raw("GET", "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def request_kwargs(case, spec):
    kwargs = {"model": spec["model"], "max_tokens": spec["max_tokens"], "temperature": case["temperature"]}
    for key in ("top_p", "seed"):
        if case.get(key) is not None:
            kwargs[key] = case[key]
    extra = {}
    if case.get("control"):
        extra["control"] = case["control"]
    return kwargs, extra


def ask(server, case, spec, prompt, stream=False, **more):
    """The text of choice 0 for one prompt (streamed chunks joined when `stream`)."""
    kwargs, extra = request_kwargs(case, spec)
    kwargs.update(more)
    if case["endpoint"] == "chat":
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            r = server.client.chat.completions.create(messages=messages, extra_body=extra, **kwargs)
            return r.choices[0].message.content
        parts = []
        for chunk in server.client.chat.completions.create(messages=messages, stream=True, extra_body=extra, **kwargs):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
        return "".join(parts)
    if not stream:
        r = server.client.completions.create(prompt=prompt, extra_body=extra, **kwargs)
        return r.choices[0].text
    parts = []
    for chunk in server.client.completions.create(prompt=prompt, stream=True, extra_body=extra, **kwargs):
        for c in chunk.choices:
            parts.append(c.text)
    return "".join(parts)


def ask_list(server, case, spec, prompts, stream=False):
    """Texts of a completions request with a list of prompts (choice i = prompt i, stream i)."""
    kwargs, extra = request_kwargs(case, spec)
    texts = [""] * len(prompts)
    if not stream:
        r = server.client.completions.create(prompt=prompts, extra_body=extra, **kwargs)
        check(len(r.choices) == len(prompts), f"{case['name']}: {len(r.choices)} choices")
        for c in r.choices:
            texts[c.index] = c.text
        return texts
    for chunk in server.client.completions.create(prompt=prompts, stream=True, extra_body=extra, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
    return texts


def check_against_generate(server, spec):
    for case in spec["cases"]:
        expected = case["expected"]
        if case.get("as_list"):
            got = ask_list(server, case, spec, spec["prompts"])
            check(got == expected, f"{case['name']}: {got!r} != generate's {expected!r}")
            streamed = ask_list(server, case, spec, spec["prompts"], stream=True)
            check(streamed == got, f"{case['name']}: streamed {streamed!r} != {got!r}")
            log(f"ok: {case['name']} (one request, a list of prompts) equals generate, streamed and not")
            continue
        for i, want in enumerate(expected):
            got = ask(server, case, spec, spec["prompts"][i])
            check(got == want, f"{case['name']} prompt {i}: {got!r} != generate's {want!r}")
            streamed = ask(server, case, spec, spec["prompts"][i], stream=True)
            check(streamed == got, f"{case['name']} prompt {i}: streamed {streamed!r} != {got!r}")
        log(f"ok: {case['name']} equals generate, streamed and not")


async def concurrent(server, spec):
    """32 requests at once, mixed endpoints, heads, alphas, sampling and streaming."""
    jobs = []
    cases = [c for c in spec["cases"] if not c.get("as_list")]
    for k in range(32):
        case = cases[k % len(cases)]
        i = k % len(case["expected"])
        jobs.append((case, i, k % 3 == 0))

    async def one(case, i, stream):
        kwargs, extra = request_kwargs(case, spec)
        prompt = spec["prompts"][i]
        if case["endpoint"] == "chat":
            messages = [{"role": "user", "content": prompt}]
            if stream:
                parts = []
                async for chunk in await server.aclient.chat.completions.create(
                        messages=messages, stream=True, extra_body=extra, **kwargs):
                    parts.extend(c.delta.content or "" for c in chunk.choices)
                return "".join(parts)
            r = await server.aclient.chat.completions.create(messages=messages, extra_body=extra, **kwargs)
            return r.choices[0].message.content
        if stream:
            parts = []
            async for chunk in await server.aclient.completions.create(
                    prompt=prompt, stream=True, extra_body=extra, **kwargs):
                parts.extend(c.text for c in chunk.choices)
            return "".join(parts)
        r = await server.aclient.completions.create(prompt=prompt, extra_body=extra, **kwargs)
        return r.choices[0].text

    before = server.metric("recontrol_batch_size_sum") / max(server.metric("recontrol_batch_size_count"), 1)
    results = await asyncio.gather(*(one(c, i, s) for c, i, s in jobs))
    for (case, i, stream), got in zip(jobs, results):
        want = case["expected"][i]
        check(got == want, f"concurrent {case['name']} prompt {i} (stream={stream}): {got!r} != {want!r}")
    sum_, count = server.metric("recontrol_batch_size_sum"), server.metric("recontrol_batch_size_count")
    log(f"ok: 32 concurrent mixed requests equal their sequential results "
        f"(mean batch before {before:.2f}, overall {sum_ / count:.2f})")
    check(sum_ / count > before, "concurrent requests were never batched together")


def check_choices_trace_and_stop(server, spec):
    cases = {c["name"]: c for c in spec["cases"]}
    # n choices: choice j samples from stream j, so choice 0 is generate's prompt 0.
    sampled = cases["chat-sampled-control-a"]
    kwargs, extra = request_kwargs(sampled, spec)
    r = server.client.chat.completions.create(
        messages=[{"role": "user", "content": spec["prompts"][0]}], n=3, extra_body=extra, **kwargs)
    check([c.index for c in r.choices] == [0, 1, 2], f"n=3 gave choices {[c.index for c in r.choices]}")
    check(r.choices[0].message.content == sampled["expected"][0], "n=3: choice 0 is not stream 0")
    check(len({c.message.content for c in r.choices}) > 1, "n=3 sampled choices are all equal")
    log("ok: n=3 sampled choices (choice 0 = generate's draw)")

    # The control trace: one entry per token, the edit moving V up.
    case = cases["chat-control-a"]
    kwargs, extra = request_kwargs(case, spec)
    extra["control_trace"] = True
    r = server.client.chat.completions.create(
        messages=[{"role": "user", "content": spec["prompts"][0]}], extra_body=extra, **kwargs)
    trace = r.choices[0].model_extra["control_trace"]
    check(len(trace) == r.usage.completion_tokens, f"trace has {len(trace)} entries for {r.usage.completion_tokens} tokens")
    check(all(t["edit_norm"] > 0 for t in trace), "a traced edit has norm 0")
    gain = sum(t["value_after"] - t["value_before"] for t in trace) / len(trace)
    check(gain > 0, f"the edits lowered V on average ({gain})")
    check(r.choices[0].message.content == case["expected"][0], "the traced answer differs")
    log(f"ok: control trace ({len(trace)} tokens, mean V gain {gain:.4f})")

    # Stop sequences: the text ends before the first one, finish_reason "stop".
    case = cases["completion-plain"]
    full = case["expected"][0]
    check(len(full) >= 6, f"the expected text {full!r} is too short for a stop test")
    stop = full[3:5]
    cut = full.find(stop)
    kwargs, extra = request_kwargs(case, spec)
    r = server.client.completions.create(prompt=spec["prompts"][0], stop=[stop], **kwargs)
    check(r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop",
          f"stop {stop!r}: {r.choices[0].text!r} ({r.choices[0].finish_reason})")
    streamed = ask(server, case, spec, spec["prompts"][0], stream=True, stop=[stop])
    check(streamed == full[:cut], f"streamed with stop {stop!r}: {streamed!r}")
    log("ok: stop sequences")


def check_bad_inputs(server, spec):
    """Each hostile request gets its documented status and an OpenAI-style error."""
    model = spec["model"]
    chat = lambda **extra: {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    comp = lambda **extra: {"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    cases = [
        ("malformed JSON", "POST", "/v1/chat/completions", b"{not json", {}, 400, "not valid JSON"),
        ("not an object", "POST", "/v1/completions", b"[1, 2]", {}, 400, "JSON object"),
        ("wrong type", "POST", "/v1/chat/completions", chat(temperature="hot"), {}, 400, "temperature"),
        ("wrong type inside", "POST", "/v1/chat/completions", chat(control={"value": "a", "alpha": "x", "steps": 1}), {}, 400, "control.alpha"),
        ("unknown field", "POST", "/v1/completions", comp(frobnicate=1), {}, 400, "frobnicate"),
        ("unsupported field", "POST", "/v1/completions", comp(logit_bias={"1": 5}), {}, 400, "logit_bias"),
        ("unknown value head", "POST", "/v1/completions", comp(control={"value": "nope", "alpha": 1, "steps": 1}), {}, 400, "no value head"),
        ("alpha out of range", "POST", "/v1/completions", comp(control={"value": "a", "alpha": 1e30, "steps": 1}), {}, 400, "control.alpha"),
        ("alpha NaN", "POST", "/v1/completions", b'{"model": "%s", "prompt": "x", "control": {"value": "a", "alpha": NaN, "steps": 1}}' % model.encode(), {}, 400, "not valid JSON"),
        ("steps 0", "POST", "/v1/completions", comp(control={"value": "a", "alpha": 1, "steps": 0}), {}, 400, "control.steps"),
        ("temperature out of range", "POST", "/v1/completions", comp(temperature=-1), {}, 400, "temperature"),
        ("prompt too long", "POST", "/v1/completions", comp(prompt=[5] * (spec["max_positions"] + 10)), {}, 400, "positions"),
        ("no room for max_tokens", "POST", "/v1/completions", comp(max_tokens=spec["max_positions"]), {}, 400, "positions"),
        ("token id outside the vocabulary", "POST", "/v1/completions", comp(prompt=[10**9]), {}, 400, "vocabulary"),
        ("unknown model", "POST", "/v1/completions", {**comp(), "model": "gpt-9"}, {}, 404, "gpt-9"),
        ("oversize body", "POST", "/v1/completions", comp(prompt="x" * (spec["max_body_bytes"] + 10)), {}, 413, "limit"),
        ("wrong API key", "POST", "/v1/completions", comp(), {"Authorization": "Bearer wrong"}, 401, "API key"),
        ("no API key", "GET", "/v1/models", None, {"Authorization": ""}, 401, "API key"),
        ("unknown route", "GET", "/v2/everything", None, {}, 404, "no route"),
        ("wrong method", "GET", "/v1/completions", None, {}, 405, "method"),
        ("queue full", "POST", "/v1/completions", comp(prompt=["x"] * (spec["max_queue"] + 1)), {}, 429, "queue is full"),
    ]
    for name, method, path, body, headers, status, needle in cases:
        got, hdrs, parsed = server.raw(method, path, body, headers)
        check(got == status, f"{name}: status {got}, expected {status} ({parsed})")
        check(isinstance(parsed, dict) and set(parsed.get("error", {})) >= {"message", "type", "param", "code"},
              f"{name}: not an OpenAI error body: {parsed!r}")
        check(needle in parsed["error"]["message"], f"{name}: {parsed['error']['message']!r} lacks {needle!r}")
        if status == 429:
            check("retry-after" in {k.lower() for k in hdrs}, f"{name}: no Retry-After header")
    # The official client sees the same statuses as its exception types.
    bad = OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        fail("a wrong API key was accepted")
    except openai.AuthenticationError:
        pass
    try:
        server.client.completions.create(model=model, prompt="x", extra_body={"control": {"value": "nope", "alpha": 1, "steps": 1}})
        fail("an unknown value head was accepted")
    except openai.BadRequestError as e:
        check("nope" in str(e), f"unknown head error: {e}")
    # Still answering, with the same tokens.
    status, _, health = server.raw("GET", "/health")
    check(status == 200 and health == {"status": "ok"}, f"health after bad inputs: {status} {health}")
    case = spec["cases"][0]
    again = ask(server, case, spec, spec["prompts"][0])
    check(again == case["expected"][0], "answers changed after the bad inputs")
    log(f"ok: {len(cases)} bad inputs got their statuses; the server still answers")


def open_stream(server, body):
    """Sends a streaming request on a raw socket and returns it after the first content chunk."""
    sock = socket.create_connection((server.host, server.port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    received = b""
    while b'"text"' not in received:
        chunk = sock.recv(4096)
        check(chunk, "the stream closed before its first chunk")
        received += chunk
    return sock, received


def wait_idle(server, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.metric("recontrol_active_rows") == 0 and server.metric("recontrol_queue_depth") == 0:
            return True
        time.sleep(0.05)
    return False


def check_disconnects(server, spec):
    """A client that goes away frees its row at the next step."""
    slow = {"value": "a", "alpha": 0.01, "steps": spec["slow_steps"]}
    body = {"model": spec["model"], "prompt": "hi", "max_tokens": 200, "temperature": 0,
            "stream": True, "control": slow}
    before = server.metric("recontrol_generated_tokens_total")
    sock, _ = open_stream(server, body)
    sock.close()
    check(wait_idle(server, 20), "a disconnected stream's row was not freed")
    used = server.metric("recontrol_generated_tokens_total") - before
    check(used < 200, f"a disconnected stream still decoded {used} tokens")
    log(f"ok: a disconnected stream stopped after {used:.0f} of 200 tokens")
    # Non-streaming: the client gives up while its request decodes.
    before = server.metric("recontrol_generated_tokens_total")
    body["stream"] = False
    sock = socket.create_connection((server.host, server.port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    deadline = time.time() + 20
    while server.metric("recontrol_generated_tokens_total") - before < 2 and time.time() < deadline:
        time.sleep(0.02)
    sock.close()
    check(wait_idle(server, 20), "a disconnected request's row was not freed")
    used = server.metric("recontrol_generated_tokens_total") - before
    check(used < 200, f"a disconnected request still decoded {used} tokens")
    log(f"ok: a disconnected non-streaming request stopped after {used:.0f} of 200 tokens")


def check_graceful_shutdown(server, spec, pid):
    """SIGTERM while a request streams: new requests are refused, the stream still completes."""
    body = {"model": spec["model"], "prompt": "hi", "max_tokens": 40, "temperature": 0,
            "stream": True, "control": {"value": "a", "alpha": 0.01, "steps": spec["slow_steps"]}}
    sock, received = open_stream(server, body)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    try:
        status, _, parsed = server.raw("POST", "/v1/completions", {"model": spec["model"], "prompt": "x", "max_tokens": 1}, timeout=5)
        check(status == 503, f"a request during shutdown got {status}: {parsed}")
    except (ConnectionError, OSError):
        pass  # the listener is already closed
    sock.settimeout(60)
    while b"data: [DONE]" not in received:
        chunk = sock.recv(65536)
        check(chunk, "the in-flight stream was cut off by the shutdown")
        received += chunk
    check(b'"finish_reason":"length"' in received, "the in-flight stream did not run to its length")
    sock.close()
    log("ok: SIGTERM let the in-flight stream finish and refused new requests")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--pid", type=int, required=True)
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    server = Server(args.base_url, args.api_key, spec["model"])
    models = server.client.models.list().data
    check([m.id for m in models] == [spec["model"]], f"models: {[m.id for m in models]}")
    heads = [h["name"] for h in models[0].model_extra["value_heads"]]
    check(heads == spec["heads"], f"value heads: {heads}")
    check_against_generate(server, spec)
    asyncio.run(concurrent(server, spec))
    check_choices_trace_and_stop(server, spec)
    check_bad_inputs(server, spec)
    check_disconnects(server, spec)
    check_graceful_shutdown(server, spec, args.pid)
    print("all server checks passed", flush=True)


if __name__ == "__main__":
    main()
