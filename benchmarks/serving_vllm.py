"""costlab's serving figures beside a real engine's: vLLM's OpenAI-compatible server, driven at the same
concurrencies with the same requests.

A Llama-style model (``llama_small``: 12.8M parameters, byte vocabulary; random weights, which change no timing)
is written with ``save_pretrained``. costlab serves it in this process as a run does (static batches with
``transformers``' cache, :mod:`costlab.measure.serving`); then vLLM is started on 127.0.0.1 from its own
virtualenv (``--vllm-python``: vLLM pins its own torch and transformers) with ``--skip-tokenizer-init`` and
driven by a closed-loop client with the same concurrency, prompts (token ids) and output lengths
(``ignore_eos``, streamed: the first streamed token is the time to first token). Prints, per concurrency,
output tokens/s, TTFT and TPOT (p50, p99) of both, and their ratios.

    python benchmarks/serving_vllm.py --vllm-python /path/to/vllm-venv/bin/python
    python benchmarks/serving_vllm.py --max-concurrency 16 --requests 32

Without ``--vllm-python`` (or where vLLM does not start) only costlab's figures are printed, and it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import torch

from costlab.data import build_corpus
from costlab.launcher.preflight import compose_config
from costlab.measure.machine import cpu_info
from costlab.measure.serving import Request, Served, draw_requests, ladder, make_engine, rung_figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(python: str, folder: Path, port: int, timeout_s: float) -> subprocess.Popen | None:
    """vLLM's OpenAI-compatible server on 127.0.0.1, or None when it does not come up in ``timeout_s``."""
    log = open(folder / "vllm.log", "w")  # noqa: SIM115  (kept open for the server's lifetime)
    proc = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32", "--gpu-memory-utilization", "0.2",
         "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(2)
    proc.terminate()
    print(f"vLLM did not start (see {folder / 'vllm.log'})")
    return None


def _one(port: int, model: str, req: Request, issued: float) -> Served:
    """One streamed completion of ``req``'s prompt ids: its first and last token times."""
    body = json.dumps({"model": model, "prompt": req.prompt.tolist(), "max_tokens": req.output_len,
                       "min_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0, "stream": True,
                       "return_token_ids": True}).encode()
    http = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                  {"Content-Type": "application/json"})
    served = Served(issued)
    with urllib.request.urlopen(http, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])["choices"][0]
            ids = chunk.get("token_ids") or [0]  # a streamed chunk is a token (its id where the server says it)
            if chunk.get("finish_reason") is None or chunk.get("token_ids") or chunk.get("text"):
                t = time.perf_counter()
                served.first = t if not served.tokens else served.first
                served.tokens += list(ids)
                served.done = t
    return served


def drive(port: int, model: str, requests: list[Request], concurrency: int) -> tuple[list[Served], float]:
    """A closed-loop client: ``concurrency`` threads, each issuing the next request when its previous ends."""
    pending, lock = deque(enumerate(requests)), threading.Lock()
    served: list[Served | None] = [None] * len(requests)
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i, req = pending.popleft()
            served[i] = _one(port, model, req, time.perf_counter())

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served, start  # type: ignore[return-value]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="python of vLLM's virtualenv")
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--start-timeout", type=float, default=600)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = compose_config(["model=hf", "model.config=llama_small", "model.block_size=128",
                          f"serve.max_concurrency={args.max_concurrency}", f"serve.requests={args.requests}"])
    torch.manual_seed(0)
    from costlab.models.hf import HFCausalLM

    model = HFCausalLM(config="llama_small", block_size=128).eval()
    s = cfg.serve
    rungs = ladder(args.max_concurrency, args.max_concurrency)
    text = build_corpus(cfg.data).val
    requests = draw_requests(text, max([args.requests, *(2 * c for c in rungs)]), tuple(s.prompt_len),
                             tuple(s.output_len), int(s.seed))
    cpu = cpu_info()
    print(f"machine: {cpu.model} ({os.cpu_count()} cores; {cpu.tags()['costlab.cpu.features']}), torch "
          f"{torch.__version__}; llama_small "
          f"(random weights), prompts {list(s.prompt_len)}, outputs {list(s.output_len)} tokens")
    engine = make_engine(model, s.prompt_len[1] + s.output_len[1])
    ours: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for c in rungs:
            reqs = requests[:max(args.requests, 2 * c)]
            engine.serve(reqs[:c], c, torch.device("cpu"))  # warm-up
            ours[c] = rung_figures(*engine.serve(reqs, c, torch.device("cpu")))
    theirs: dict[int, dict[str, float]] = {}
    if args.vllm_python:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model.save_pretrained(folder)
            port = _free_port()
            t0 = time.time()
            server = start_vllm(args.vllm_python, folder, port, args.start_timeout)
            if server is not None:
                print(f"vLLM started in {time.time() - t0:.0f} s")
                try:
                    for c in rungs:
                        reqs = requests[:max(args.requests, 2 * c)]
                        drive(port, str(folder), reqs[:c], c)  # warm-up
                        served, start = drive(port, str(folder), reqs, c)
                        short = sum(len(x.tokens) != r.output_len for x, r in zip(served, reqs, strict=True))
                        if short:  # the figures would count other work than costlab's
                            raise RuntimeError(f"vLLM returned other token counts for {short} request(s)")
                        theirs[c] = rung_figures(served, start)
                finally:
                    server.terminate()
                    server.wait(60)
    else:
        print("no --vllm-python: costlab's figures only")
    keys = [("serve/output_tokens_per_s", "tok/s"), ("serve/ttft_ms_p50", "TTFT p50"),
            ("serve/ttft_ms_p99", "TTFT p99"), ("serve/tpot_ms_p50", "TPOT p50"), ("serve/tpot_ms_p99", "TPOT p99")]
    print(f"{'c':>3} " + " ".join(f"{label + ' costlab':>17}" + (f" {'vLLM':>9} {'ratio':>6}" if theirs else "")
                                  for _, label in keys))
    for c in rungs:
        cells = []
        for key, _ in keys:
            cell = f"{ours[c][key]:>17.2f}"
            if c in theirs:
                cell += f" {theirs[c][key]:>9.2f} {ours[c][key] / theirs[c][key]:>5.2f}x"
            cells.append(cell)
        print(f"{c:>3} " + " ".join(cells))


if __name__ == "__main__":
    main()
