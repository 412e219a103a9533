"""Multi-LoRA serving benchmark: one base model, 8 and 32 rank-8 adapters, many requests at once.

Prints three figures, each side by side in one run:
  (a) throughput with requests spread over all adapters / all on one adapter   (target >= 0.85)
  (b) posttrain engine / PEFT baseline on the same requests                     (target >= 3x)
      baseline: transformers `generate` on a PeftModel holding every adapter, mixed batches
      through PEFT's `adapter_names=` argument, static batches of the same size
  (c) memory added per resident adapter (stacked bank bytes, and process RSS growth)
  (d) posttrain engine / vLLM (with --vllm-python) on the same requests, each with its adapter
  (e) `posttrain serve` over HTTP / the same engine in-process: the requests sent all at once by the
      real `openai` client from a thread pool, to a server in its own process     (target >= 0.9)
      With --client-cpus N the client runs on the last N CPUs and everything else (the engine in-process,
      PEFT, vLLM, the server) on the rest, as when the clients are other machines; without it the client
      takes its CPU from the server's.

Everything is built locally (the `small` tiny Llama, adapters from PEFT with random weights);
generation ignores end-of-sequence, so both sides produce exactly the tokens each request asked for
(max_tokens differs per request unless --fixed-lengths; throughput counts those tokens only).

    python bench/serve.py            # full run (a quiet machine, several minutes on 2 CPU cores)
    python bench/serve.py --quick    # a smoke run
    python bench/serve.py --client-cpus 1    # the openai client on a core of its own
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
from common import work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CPU = torch.device("cpu")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_adapters(base_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    """`count` PEFT LoRA folders with random (non-zero) weights, from one PeftModel re-randomised per save."""
    from peft import LoraConfig, get_peft_model

    from posttrain.model.loading import load_model

    model = get_peft_model(load_model(str(base_dir), device=CPU),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    names = []
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / f"lora{i}")
        names.append(f"lora{i}")
    return names


def make_requests(n: int, vocab: int, seed: int, min_len: int, max_len: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def run_engine(engine, prompts, adapters, lengths) -> tuple[float, list[list[int]]]:
    from posttrain.inference.sampling import SamplingParams

    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outs = engine.generate(prompts, params, adapters)
    seconds = time.perf_counter() - start
    return sum(lengths) / seconds, [o.token_ids for o in outs]


def run_peft(model, prompts, names, lengths, batch_size, pad_id) -> tuple[float, list[list[int]]]:
    """Static left-padded batches in arrival order, one PEFT mixed-adapter generate per batch; a batch runs
    until its longest request is done (generate has no per-row max_new_tokens), rows are cut to their own."""
    outs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_names = prompts[i:i + batch_size], names[i:i + batch_size]
        new_tokens = max(lengths[i:i + batch_size])
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, adapter_names=chunk_names,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=None)
        outs += [row[:n] for row, n in zip(gen[:, width:].tolist(), lengths[i:i + batch_size])]
    seconds = time.perf_counter() - start
    return sum(lengths) / seconds, outs


class HTTPServer:
    """`posttrain serve` in its own process, every adapter folder of `adapter_dir` served; requests from the
    `openai` client, all in flight at once (one thread each), timed from the first sent to the last answered."""

    def __init__(self, base_dir: Path, adapter_dir: Path, max_loras: int, batch_size: int,
                 client_cpus: set[int] | None = None):
        import socket
        import subprocess

        self.client_cpus = client_cpus

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "posttrain", "serve", f"model={base_dir}", f"adapter_dirs=[{adapter_dir}]",
             f"port={self.port}", f"max_loras={max_loras}", f"max_batch_size={batch_size}", "device=cpu"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"posttrain serve did not start:\n{self.process.stderr.read()[-2000:]}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def generate(self, prompts, lengths, names) -> tuple[float, list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)

        def one(i):
            r = client.completions.create(model=names[i], prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.usage.completion_tokens, r.choices[0].text

        server_cpus = os.sched_getaffinity(0)
        if self.client_cpus:  # this thread and the pool's threads, which take its CPUs when they start
            os.sched_setaffinity(0, self.client_cpus)
        try:
            with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
                t, cpu = time.perf_counter(), (time.process_time(), self._server_cpu())
                done = list(pool.map(one, range(len(prompts))))
                seconds = time.perf_counter() - t
        finally:
            os.sched_setaffinity(0, server_cpus)
        # CPU seconds per wall second, of this client and of the server: on a small machine they share cores
        self.load = ((time.process_time() - cpu[0]) / seconds, (self._server_cpu() - cpu[1]) / seconds)
        return sum(n for n, _ in done) / seconds, [text for _, text in done]

    def _server_cpu(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


class VLLMWorker:
    """vLLM in its own environment (posttrain's generation/vllm_worker.py), timed from here per call; the
    worker's own generate time is what counts (no pipe or JSON in it)."""

    def __init__(self, python: str, base_dir: Path, max_loras: int, args):
        self.python, self.base_dir, self.max_loras, self.args = python, base_dir, max_loras, args

    def __enter__(self):
        import json
        import subprocess

        from posttrain.generation.vllm_worker import __file__ as worker

        from posttrain.generation.vllm_backend import vllm_env

        env = vllm_env(kv_cache_gib=2)
        self.json = json
        self.proc = subprocess.Popen([self.python, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.version = self._call("start", model=str(self.base_dir), max_model_len=256,
                                  max_num_seqs=self.args.batch_size, enable_lora=True, max_lora_rank=self.args.rank,
                                  max_loras=self.max_loras)["version"]
        return self

    def _call(self, op, **request):
        self.proc.stdin.write(self.json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        reply = self.json.loads(self.proc.stdout.readline())
        if not reply.pop("ok"):
            raise SystemExit(f"vLLM {op}: {reply['error']}")
        return reply

    def generate(self, prompts, lengths, loras):
        params = [{"max_tokens": n, "temperature": 0.0, "ignore_eos": True} for n in lengths]
        start = time.perf_counter()
        done = self._call("generate", prompts=prompts, params=params, loras=loras)["completions"]
        seconds = time.perf_counter() - start
        return sum(lengths) / seconds, [c["token_ids"] for c in done]

    def __exit__(self, *exc):
        self._call("close")
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few requests and tokens: checks that it runs")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--adapters", default="8,32", help="adapter counts to measure")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="the longest completion")
    parser.add_argument("--fixed-lengths", action="store_true",
                        help="every request asks for --new-tokens (default: uniform in [new-tokens/8, new-tokens], "
                             "as real completions differ in length)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows decoded together (both sides)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings per configuration")
    parser.add_argument("--client-cpus", type=int, default=0,
                        help="run the HTTP client on the last N CPUs and everything else on the rest (default: shared)")
    parser.add_argument("--vllm-python", default=os.environ.get("POSTTRAIN_VLLM_PYTHON"),
                        help="the Python of vLLM's environment (`make vllm`): adds (d), posttrain vs vLLM on the same "
                             "requests and adapters (default: $POSTTRAIN_VLLM_PYTHON; none: left out)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.repeats = 64, 32, 2
    client_cpus = None
    if args.client_cpus:
        cpus = sorted(os.sched_getaffinity(0))
        if not 0 < args.client_cpus < len(cpus):
            raise SystemExit(f"--client-cpus {args.client_cpus}: this process has {len(cpus)} CPUs; give the client 1 to "
                             f"{len(cpus) - 1}, leaving the rest to the server")
        client_cpus = set(cpus[-args.client_cpus:])
        os.sched_setaffinity(0, cpus[:-args.client_cpus])  # children (the server, vLLM) start with this mask
        torch.set_num_threads(args.threads or len(cpus) - args.client_cpus)
    elif args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]

    from transformers.utils import logging as hf_logging

    from posttrain.inference.engine import Engine
    from posttrain.inference.registry import AdapterRegistry
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.model.tiny import write_tiny_model

    hf_logging.set_verbosity_error()
    work = work_dir(None, "posttrain-bench-serve-")  # removed at exit (it holds a model and every adapter)
    base_dir = write_tiny_model(work / "base", size=args.size)
    tok = load_tokenizer(str(base_dir))
    names_all = write_adapters(base_dir, work / "adapters", max(counts), args.rank)
    prompts = make_requests(args.requests, len(tok), seed=0, min_len=16, max_len=96)
    rng = random.Random(1)
    lengths = [args.new_tokens if args.fixed_lengths else rng.randint(max(1, args.new_tokens // 8), args.new_tokens)
               for _ in prompts]
    print(f"base: {args.size} Llama ({sum(p.numel() for p in load_model(str(base_dir), device=CPU).parameters()) / 1e6:.1f}M "
          f"params); {args.requests} requests, {sum(lengths)} new tokens in all ({'each ' + str(args.new_tokens) if args.fixed_lengths else f'{min(lengths)}-{max(lengths)} each'}), prompts 16-96 tokens; batch "
          f"{args.batch_size}; rank-{args.rank} LoRA on {','.join(TARGETS)}; torch threads {torch.get_num_threads()}"
          + (f"; HTTP client on CPU {sorted(client_cpus)}, the rest on {sorted(os.sched_getaffinity(0))}" if client_cpus else ""))

    for count in counts:
        names = names_all[:count]
        model = load_model(str(base_dir), device=CPU).eval()
        engine = Engine(model, tok, max_batch_size=args.batch_size)
        registry = AdapterRegistry(engine.dims, model.config, tok, torch.float32, CPU, max_loras=count,
                                   allowed_roots=[work / "adapters"])
        engine.registry = registry
        adapters = [registry.add(n, n) for n in names]
        # (c) memory: make every adapter resident, measure the bank and the process
        rss0, bank0 = rss_bytes(), registry.bank.nbytes()
        for a in adapters:
            registry.acquire(a)
            registry.release(a)
        per_bank = (registry.bank.nbytes() - bank0) / count
        per_rss = (rss_bytes() - rss0) / count
        own = sum(t.numel() * 4 for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            work / "adapters" / names[0] / "adapter_model.safetensors").values())

        spread = [adapters[i % count] for i in range(len(prompts))]
        single = [adapters[0]] * len(prompts)
        run_engine(engine, prompts[:4], spread[:4], [4] * 4)  # warm-up
        best = {"spread": 0.0, "single": 0.0}
        for r in range(args.repeats):  # interleaved, order alternating, best of N: less sensitive to a busy machine
            for kind in (("spread", "single") if r % 2 == 0 else ("single", "spread")):
                best[kind] = max(best[kind], run_engine(engine, prompts, spread if kind == "spread" else single,
                                                        lengths)[0])
        _, ours = run_engine(engine, prompts, spread, lengths)

        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(load_model(str(base_dir), device=CPU), str(work / "adapters" / names[0]),
                                               adapter_name=names[0])
        for n in names[1:]:
            peft_model.load_adapter(str(work / "adapters" / n), adapter_name=n)
        peft_model.eval()
        peft_names = [a.name for a in spread]
        run_peft(peft_model, prompts[:4], peft_names[:4], [4] * 4, args.batch_size, tok.pad_token_id)  # warm-up
        peft_best, theirs = 0.0, None
        for _ in range(args.repeats):
            tps, theirs = run_peft(peft_model, prompts, peft_names, lengths, args.batch_size, tok.pad_token_id)
            peft_best = max(peft_best, tps)
        same = sum(a == b for a, b in zip(ours, theirs)) / len(ours)

        print(f"\n{count} adapters")
        print(f"  (a) spread over {count} adapters: {best['spread']:8.1f} tok/s   all on one: {best['single']:8.1f} tok/s"
              f"   ratio {best['spread'] / best['single']:.2f} (target >= 0.85)")
        print(f"  (b) posttrain: {best['spread']:8.1f} tok/s   PEFT adapter_names generate: {peft_best:8.1f} tok/s"
              f"   ratio {best['spread'] / peft_best:.2f}x (target >= 3x); identical greedy outputs: {same:.0%}")
        print(f"  (c) per resident adapter: {per_bank / 2**20:.2f} MiB in the stacked bank (padded rank "
              f"{registry.bank.rank}), {per_rss / 2**20:.2f} MiB process RSS; the adapter's own weights: "
              f"{own / 2**20:.2f} MiB fp32")
        if args.vllm_python:
            vllm_best, theirs = 0.0, None
            with VLLMWorker(args.vllm_python, base_dir, count, args) as worker:
                loras = [{"name": a.name, "id": names.index(a.name) + 1, "path": str(a.path)} for a in spread]
                worker.generate(prompts[:4], [4] * 4, loras[:4])  # warm-up
                for _ in range(args.repeats):
                    tps, theirs = worker.generate(prompts, lengths, loras)
                    vllm_best = max(vllm_best, tps)
            same = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
            print(f"  (d) posttrain: {best['spread']:8.1f} tok/s   vLLM {worker.version} (LLM.generate, a LoRARequest "
                  f"per request): {vllm_best:8.1f} tok/s   ratio {best['spread'] / vllm_best:.2f}x; identical greedy "
                  f"outputs: {same:.0%}")
        with HTTPServer(base_dir, work / "adapters", count, args.batch_size, client_cpus) as server:
            names_sent = [a.name for a in spread]
            server.generate(prompts[:4], [4] * 4, names_sent[:4])  # warm-up
            http_best, texts = 0.0, []
            for _ in range(args.repeats):
                tps, texts = server.generate(prompts, lengths, names_sent)
                http_best = max(http_best, tps)
        same = sum(tok.decode(a) == b for a, b in zip(ours, texts)) / len(ours)
        print(f"  (e) posttrain serve over HTTP (openai client, {len(prompts)} requests at once): {http_best:8.1f} tok/s"
              f"   the engine in-process: {best['spread']:8.1f} tok/s   ratio {http_best / best['spread']:.2f} "
              f"(target >= 0.9); identical greedy outputs: {same:.0%}; CPU cores busy: client {server.load[0]:.2f}, "
              f"server {server.load[1]:.2f}")
        del peft_model, engine, model


if __name__ == "__main__":
    main()
