"""Load generator process of bench/gateway_bench.py (not a test): ``python bench/_loadgen.py '<json spec>'``.

One aiohttp client session on uvloop drives ``concurrency`` request loops ("slots") at one
OpenAI-compatible endpoint and prints one JSON line of results. Kept out of the orchestrating
process so that its CPU is its own and the same client code measures the simulator directly
and the gateway.

Timing model, the same for both paths:
- slot i starts at ``start_at + ramp_s * i / concurrency`` (CLOCK_MONOTONIC, shared by all
  processes of the machine), so arrivals are spread the way independent users spread them,
  instead of all streams ticking in lockstep;
- the measured window is ``[start_at + ramp_s, start_at + ramp_s + seconds]``: every slot is busy
  during all of it. Throughput counts only the tokens received inside the window; TTFT only the
  requests started inside it. No request starts after the window; those running finish (their
  tokens still count for correctness and for the gateway's CPU per token).

Streams are parsed per SSE event (``data: ...\\n\\n``): a content event is one token (vLLM sends
one token per event; the first ``{"role":"assistant","content":""}`` event is not a token), TTFT
is the time to the first content event, and a stream is correct only if it ends with
``data: [DONE]`` and carries exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

EMPTY = b'"content":""'
CONTENT = (b'"content":"', b'"text":"')
DONE = b"data: [DONE]"


async def _stream(session, url: str, body: bytes, headers: dict, out: dict, window: tuple[float, float]) -> None:
    now = time.monotonic
    started = now()
    first: float | None = None
    tokens = 0
    done = False
    lo, hi = window
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            out["errors"] += 1
            out["error_sample"] = out["error_sample"] or f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
            return
        buf = b""
        async for piece in resp.content.iter_any():
            t = now()
            buf += piece
            if b"\n\n" not in buf:
                continue
            *events, buf = buf.split(b"\n\n")
            counted = 0
            for event in events:
                if event.startswith(DONE):
                    done = True
                elif (CONTENT[0] in event or CONTENT[1] in event) and EMPTY not in event:
                    counted += 1
            if counted:
                if first is None:
                    first = t
                tokens += counted
                if lo <= t <= hi:
                    out["window_tokens"] += counted
    out["tokens"] += tokens
    out["requests"] += 1
    if not done or tokens != out["expect_tokens"] or buf.strip():
        out["bad"] += 1
        out["bad_sample"] = out["bad_sample"] or f"tokens {tokens}, [DONE] {done}, trailing {buf[:80]!r}"
    if first is not None and lo <= started <= hi:
        out["ttft_ms"].append(round((first - started) * 1000, 3))
    if lo <= now() <= hi:
        out["window_requests"] += 1


async def _json(session, url: str, body: bytes, headers: dict, out: dict, window: tuple[float, float]) -> None:
    async with session.post(url, data=body, headers=headers) as resp:
        data = await resp.read()
        if resp.status != 200:
            out["errors"] += 1
            out["error_sample"] = out["error_sample"] or f"HTTP {resp.status}: {data[:200]!r}"
            return
    answer = json.loads(data)
    tokens = answer["usage"]["completion_tokens"]
    out["tokens"] += tokens
    out["requests"] += 1
    if tokens != out["expect_tokens"] or not answer["choices"][0]["message"]["content"]:
        out["bad"] += 1
        out["bad_sample"] = out["bad_sample"] or f"usage {answer.get('usage')}"
    t = time.monotonic()
    if window[0] <= t <= window[1]:
        out["window_requests"] += 1
        out["window_tokens"] += tokens


async def drive(spec: dict) -> dict:
    import aiohttp

    url = spec["base_url"] + "/v1/chat/completions"
    body = json.dumps(
        {
            "model": spec["model"],
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": spec["max_tokens"],
            "stream": spec["stream"],
        }
    ).encode()
    headers = {"Authorization": f"Bearer {spec['api_key']}", "Content-Type": "application/json"}
    out = {
        "tokens": 0,
        "requests": 0,
        "errors": 0,
        "bad": 0,
        "window_tokens": 0,
        "window_requests": 0,
        "ttft_ms": [],
        "error_sample": "",
        "bad_sample": "",
        "expect_tokens": spec["max_tokens"],
    }
    one = _stream if spec["stream"] else _json
    concurrency, ramp = spec["concurrency"], spec["ramp_s"]
    start_at = spec["start_at"]
    window = (start_at + ramp, start_at + ramp + spec["seconds"])
    hard_stop = window[1] + spec["grace_s"]
    offset = spec.get("slot_offset", 0)
    total_slots = spec.get("total_slots", concurrency)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def slot(i: int) -> None:
            await asyncio.sleep(max(0.0, start_at + ramp * (offset + i) / total_slots - time.monotonic()))
            while time.monotonic() < window[1]:
                try:
                    await one(session, url, body, headers, out, window)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    out["errors"] += 1
                    out["error_sample"] = out["error_sample"] or repr(exc)[:200]

        tasks = [asyncio.create_task(slot(i)) for i in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=max(1.0, hard_stop - time.monotonic()))
        for task in pending:  # bounded in time, whatever the server does
            task.cancel()
        out["unfinished"] = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    return out


def main(spec_json: str) -> None:
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # the gateway's requirements include it; plain asyncio still measures both paths alike
        run = asyncio.run
    print(json.dumps(run(drive(json.loads(spec_json)))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
