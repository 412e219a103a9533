"""The engine on a GPU: decode steps replayed from CUDA graphs (inference/cuda_graphs.py) give what the
eager steps give. Skipped on machines without CUDA (CI has none; run it where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch
from inference_fixtures import lively_model_dir, reference_greedy  # noqa: F401

from posttrain.inference.engine import Engine
from posttrain.inference.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXTS = ["reverse 12345", "hello there, how are you today?", "a", "the quick brown fox jumps over the lazy dog",
         "zz top 99", "x", "12", "one more prompt"]


@pytest.fixture(scope="module")
def base(lively_model_dir):
    from posttrain.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(lively_model_dir))
    return load_model(str(lively_model_dir), device=torch.device("cuda")).eval(), tok


@pytest.fixture(scope="module")
def prompts(base):
    return [base[1](t)["input_ids"] for t in TEXTS]


def test_graph_decode_is_greedy_transformers_with_rows_joining_leaving_and_the_cache_growing(base, prompts):
    model, tok = base
    lengths = [5, 300, 12, 40, 3, 17, 260, 9]  # 300 tokens outgrow the cache's first 256 positions
    engine = Engine(model, tok, max_batch_size=3)  # batches of 1..3 rows: padded to graph buckets 1, 2, 4 -> 3
    assert engine.graphs is not None
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths])
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.token_ids == reference_greedy(model, prompt, n)
    assert len(engine.graphs.graphs) > 1


def test_seeded_sampling_is_the_same_with_and_without_graphs(base, prompts):
    model, tok = base
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in range(8)]
    graphed = Engine(model, tok, max_batch_size=8).generate(prompts, params)
    eager = Engine(model, tok, max_batch_size=8, cuda_graphs=False).generate(prompts, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]


def test_graphs_read_weights_updated_in_place(base, prompts):
    # RL: the engine generates from the live parameters of a model that trains between rollouts.
    model, tok = base
    engine = Engine(model, tok, max_batch_size=4, fuse_weights=False)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    before = engine.generate(prompts[:4], params)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "mlp" in name:
                    p.mul_(-1.0)
        after = engine.generate(prompts[:4], params)
        assert [o.token_ids for o in after] != [o.token_ids for o in before]
        assert [o.token_ids for o in after] == [reference_greedy(model, p, 16) for p in prompts[:4]]
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


def test_seeded_draws_are_the_cpus():
    # The draws hash (seed, counter) on the CPU whatever the device, so a GPU picks what a CPU picks (up to
    # rows whose uniform falls within float rounding of a token boundary).
    from posttrain.inference.sampling import choose_tokens

    n = 4096
    logits = torch.randn(n, 300, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.9, top_k=40 if j % 2 else 0, top_p=0.95 if j % 3 else 1.0) for j in range(n)]
    seeds, history = list(range(n)), [[1] * (j % 7) for j in range(n)]
    cpu = [c.token for c in choose_tokens(logits, params, seeds, [[]] * n, history)]
    gpu = [c.token for c in choose_tokens(logits.cuda(), params, seeds, [[]] * n, history)]
    assert sum(a == b for a, b in zip(cpu, gpu)) >= n - 4
