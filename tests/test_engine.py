"""The generation engine: exactness against transformers/PEFT, sampling, stops, batching, adapters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from inference_fixtures import (CPU, adapter_root, lively_model_dir, make_lively, make_lora,  # noqa: F401
                                one_torch_thread,
                                reference_greedy)

from posttrain.errors import ConfigError
from posttrain.inference.engine import Engine, Request
from posttrain.inference.request_errors import AdapterError, RequestError, RequestTooLarge
from posttrain.inference.registry import AdapterRegistry
from posttrain.inference.sampling import SamplingParams, choose_tokens, row_uniforms

TEXTS = ["reverse 12345", "hello there, how are you today?", "a", "the quick brown fox jumps over the lazy dog",
         "zz top 99", "x"]


@pytest.fixture(scope="module")
def base(lively_model_dir):
    from posttrain.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(lively_model_dir))
    model = load_model(str(lively_model_dir), device=CPU).eval()
    return model, tok


@pytest.fixture(scope="module")
def prompts(base):
    _, tok = base
    return [tok(t)["input_ids"] for t in TEXTS]


def make_engine(base, adapter_root=None, max_loras=8, **kwargs):
    model, tok = base
    engine = Engine(model, tok, **kwargs)
    if adapter_root is not None:
        engine.registry = AdapterRegistry(engine.dims, model.config, tok, torch.float32, CPU, max_loras=max_loras,
                                          allowed_roots=[adapter_root])
    return engine


def test_greedy_matches_transformers_with_requests_joining_and_leaving(base, prompts):
    model, _ = base
    lengths = [5, 30, 12, 20, 3, 17]
    engine = make_engine(base, max_batch_size=2)  # 6 requests through 2 slots: rows join as others finish
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths])
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.token_ids == reference_greedy(model, prompt, n)
        assert out.finish_reason == "length"
    assert not engine.running and not engine.waiting


def test_finished_rows_free_their_slot_between_decode_steps(base, prompts):
    engine = make_engine(base, max_batch_size=2)
    long = Request(prompts[1], SamplingParams(max_new_tokens=20, ignore_eos=True))
    short = Request(prompts[0], SamplingParams(max_new_tokens=2, ignore_eos=True))
    late = Request(prompts[2], SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.add(long)
    engine.add(short)
    engine.add(late)  # no slot yet
    finished_at = {}
    step = 0
    while engine.has_work():
        step += 1
        for out in engine.step():
            finished_at[out.request_id] = step
        if step == 2:  # `short` finished in step 2 and left; `late` takes its slot in step 3
            assert len(engine.running) == 1 and engine.waiting == [late]
    assert finished_at[short.request_id] == 2
    assert finished_at[late.request_id] == 5  # admitted in step 3 (prefill = token 1), tokens 2-3 in steps 4-5
    assert finished_at[long.request_id] == 20


def test_generate_wrapper_matches_transformers_generate(base, prompts):
    from posttrain.generation.texts import generate

    model, tok = base
    free = make_engine(base).generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    # an ordinary token that some rows generate midway: rows stop at different lengths, with it in their text
    common = free[1].token_ids[5]
    assert not tok.convert_ids_to_tokens(common).startswith("<|")
    stops = [tok.eos_token_id, common]
    ours = generate(model, tok, prompts, max_new_tokens=16, stop_ids=stops, batch_size=4)
    theirs = generate(model, tok, prompts, max_new_tokens=16, stop_ids=stops, batch_size=4, backend="hf")
    assert ours == theirs


def test_hf_backend_keeps_per_request_seeds_and_gives_log_probs(base, prompts):
    """transformers' generate as a backend: a seeded sample does not depend on what shares the call, and
    greedy log-probs are the engine's (raw logits)."""
    from posttrain.generation.backend import open_backend

    model, tok = base
    hf = open_backend("hf", model, tok)
    sampled = lambda rows, seeds: hf.generate(rows, [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s,  # noqa
                                                                    ignore_eos=True) for s in seeds])
    alone = sampled(prompts[:1], [11])[0].token_ids
    assert sampled([prompts[2], prompts[0], prompts[1]], [5, 11, 7])[1].token_ids == alone
    assert sampled(prompts[:1], [12])[0].token_ids != alone
    greedy = [SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=0)] * 3
    ours, engine = hf.generate(prompts[:3], greedy), make_engine(base).generate(prompts[:3], greedy)
    for a, b in zip(ours, engine):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_repetition_penalty_matches_transformers(base, prompts):
    model, _ = base
    engine = make_engine(base)
    outs = engine.generate(prompts[:3], SamplingParams(max_new_tokens=12, repetition_penalty=1.5, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_seeded_sampling_does_not_depend_on_batch_companions(base, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = make_engine(base).generate([prompts[0]], params)[0]
    mixed = make_engine(base).generate(
        [prompts[3], prompts[0], prompts[1]],
        [SamplingParams(max_new_tokens=5, temperature=0.7, seed=1), params, SamplingParams(max_new_tokens=9)])[1]
    assert alone.token_ids == mixed.token_ids
    other = make_engine(base).generate([prompts[0]], SamplingParams(**{**params.__dict__, "seed": 8}))[0]
    assert other.token_ids != alone.token_ids


def test_repeated_prompts_prefill_once_and_sample_as_if_alone(base, prompts):
    # A GRPO group: the same prompt several times between others. The shared prompt is computed once and
    # its KV copied to every row's slot; each row must still decode exactly as it would alone.
    model, _ = base
    order = [0, 0, 3, 0, 1, 3, 0]
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in range(len(order))]
    batch = make_engine(base).generate([prompts[i] for i in order], params)
    for i, p, out in zip(order, params, batch):
        assert out.token_ids == make_engine(base).generate([prompts[i]], p)[0].token_ids
    greedy = make_engine(base).generate([prompts[1]] * 3, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert all(o.token_ids == reference_greedy(model, prompts[1], 12) for o in greedy)
    assert len({tuple(o.token_ids) for o in batch[:2] + batch[3:4]}) > 1  # different seeds: different samples


def test_top_k_one_and_tiny_top_p_are_greedy(base, prompts):
    engine = make_engine(base)
    greedy = engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, ignore_eos=True))
    k1 = engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))
    p0 = engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, ignore_eos=True))
    assert [o.token_ids for o in k1] == [o.token_ids for o in greedy] == [o.token_ids for o in p0]


def test_sampled_tokens_follow_the_filtered_distribution():
    # One row of logits drawn by 20000 rows with seeds 0..19999 at once: the frequencies match softmax(logits / T) cut to
    # top_k then top_p (tokens outside never appear).
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    n = 20000
    tokens = torch.tensor([c.token for c in choose_tokens(logits.expand(n, -1).clone(), [params] * n, list(range(n)),
                                                          [[]] * n, [[]] * n)])
    probs = (logits / 0.8).softmax(-1)
    probs[5] = 0  # top_k 5
    probs /= probs.sum()
    keep = (probs.cumsum(-1) - probs) < 0.9
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert (freq[~keep] == 0).all()
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)


def test_logprobs_are_the_models_own(base, prompts):
    model, _ = base
    engine = make_engine(base)
    out = engine.generate([prompts[1]], SamplingParams(max_new_tokens=4, logprobs=3, ignore_eos=True))[0]
    full = torch.tensor([prompts[1] + out.token_ids])
    with torch.no_grad():
        logp = model(full).logits[0].log_softmax(-1)
    for i, choice in enumerate(out.logprobs):
        row = logp[len(prompts[1]) - 1 + i]
        assert choice.token == out.token_ids[i]
        assert choice.logprob == pytest.approx(float(row[choice.token]), abs=1e-4)
        assert [t for t, _ in choice.top] == row.topk(3).indices.tolist()


def test_stop_strings_and_stop_tokens(base, prompts):
    _, tok = base
    engine = make_engine(base)
    free = engine.generate([prompts[1]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(free.text) > 6
    stop = free.text[4:7]
    cut = engine.generate([prompts[1]], SamplingParams(max_new_tokens=20, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    token = free.token_ids[3]
    by_id = engine.generate([prompts[1]], SamplingParams(max_new_tokens=20, stop_token_ids=[token], ignore_eos=True))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:free.token_ids.index(token) + 1]
    assert by_id.text == tok.decode(by_id.token_ids[:-1], skip_special_tokens=True)


def test_streamed_deltas_add_up_and_never_show_part_of_a_stop_string(base, prompts):
    engine = make_engine(base)
    free = engine.generate([prompts[3]], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    stop = free.text[8:12]
    request = Request(prompts[3], SamplingParams(max_new_tokens=24, stop=[stop], ignore_eos=True), stream=True)
    engine.add(request)
    deltas = []
    while engine.has_work():
        deltas += [o.text for o in engine.step()]
    text = "".join(deltas)
    assert text == free.text[:free.text.index(stop)]
    shown = ""
    for d in deltas:  # no prefix of what was shown so far ever ends inside the stop string's start
        shown += d
        assert stop not in shown


def test_bad_requests_are_refused_with_the_field(base, prompts):
    engine = make_engine(base, max_seq_len=64)
    with pytest.raises(RequestTooLarge, match="maximum context length is 64"):
        engine.add(Request(prompts[3], SamplingParams(max_new_tokens=60)))
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0), "max_tokens"),
                       (dict(stop_token_ids=[10**6]), "stop_token_ids"), (dict(logprobs=50), "logprobs")]:
        with pytest.raises(RequestError) as info:
            engine.add(Request(prompts[0], SamplingParams(**bad)))
        assert info.value.param == field
    with pytest.raises(RequestError, match="empty"):
        engine.add(Request([], SamplingParams()))


def test_abort_frees_the_slot(base, prompts):
    engine = make_engine(base, max_batch_size=1)
    first = Request(prompts[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    second = Request(prompts[1], SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.add(first)
    engine.add(second)
    engine.step()
    engine.abort(first.request_id)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(first.request_id, "abort")]
    assert engine.running == [] and engine.waiting == [second]
    engine.step()
    assert engine.running[0].request is second


# ---- adapters ----

def merged_reference(lively_model_dir, adapter_dir, prompt, n):
    from peft import PeftModel

    from posttrain.model.loading import load_model

    model = PeftModel.from_pretrained(load_model(str(lively_model_dir), device=CPU), str(adapter_dir))
    return reference_greedy(model.merge_and_unload().eval(), prompt, n)


def test_mixed_lora_batch_equals_each_request_alone_merged(base, prompts, adapter_root, lively_model_dir):
    model, _ = base
    # max_loras=2 with three LoRAs: adapters are evicted and reloaded while the batch runs
    engine = make_engine(base, adapter_root, max_loras=2, max_batch_size=8)
    names = ["qv8", None, "all4", "mlp16", "qv8", "all4"]
    adapters = {n: engine.registry.add(n, n) for n in set(names) - {None}}
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True),
                           [adapters[n] if n else None for n in names])
    for prompt, name, out in zip(prompts, names, outs):
        expected = (merged_reference(lively_model_dir, adapter_root / name, prompt, 10) if name
                    else reference_greedy(model, prompt, 10))
        assert out.token_ids == expected, name
    assert out.token_ids != reference_greedy(model, prompts[-1], 10)  # the adapters do change the output
    assert engine.registry.bank.rank == 16 and len(engine.registry.resident()) == 2


def peft_full_forward_greedy(lively_model_dir, adapter_dir, prompt, n):
    """Greedy decoding by re-running PEFT's forward on the whole sequence (its training-time semantics)."""
    from peft import PeftModel

    from posttrain.model.loading import load_model

    model = PeftModel.from_pretrained(load_model(str(lively_model_dir), device=CPU), str(adapter_dir)).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_prompt_p_and_prefix_tuning_rows_share_a_batch_with_lora_and_base_rows(base, prompts, adapter_root,
                                                                                lively_model_dir):
    model, _ = base
    engine = make_engine(base, adapter_root)
    names = ["prompt5", "ptune4", "qv8", None, "prefix3", "prefix3"]
    adapters = {n: engine.registry.add(n, n) for n in set(names) - {None}}
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True),
                           [adapters[n] if n else None for n in names])
    for name, prompt, out in zip(names, prompts, outs):
        if name is None:
            expected = reference_greedy(model, prompt, 8)
        elif name == "qv8":
            expected = merged_reference(lively_model_dir, adapter_root / name, prompt, 8)
        else:
            expected = peft_full_forward_greedy(lively_model_dir, adapter_root / name, prompt, 8)
        assert out.token_ids == expected, name
    assert outs[4].token_ids != reference_greedy(model, prompts[4], 8)


def test_lru_eviction_waits_when_every_slot_is_pinned(base, prompts, adapter_root):
    engine = make_engine(base, adapter_root, max_loras=1, max_batch_size=4)
    a, b = engine.registry.add("qv8", "qv8"), engine.registry.add("all4", "all4")
    ra = Request(prompts[0], SamplingParams(max_new_tokens=6, ignore_eos=True), a)
    rb = Request(prompts[1], SamplingParams(max_new_tokens=2, ignore_eos=True), b)
    engine.add(ra)
    engine.add(rb)
    engine.step()
    assert [s.request for s in engine.running] == [ra] and engine.waiting == [rb]  # the one slot is pinned by ra
    while engine.waiting:
        engine.step()
    assert engine.registry.resident() == ["all4"]


def test_adapter_names_and_paths_are_checked(base, adapter_root, lively_model_dir, tmp_path):
    engine = make_engine(base, adapter_root)
    registry = engine.registry
    for name in ["", "-x", "a/b", "a b", "x" * 129, "../etc"]:
        with pytest.raises(AdapterError, match="not allowed"):
            registry.add(name, "qv8")
    outside = tmp_path / "outside"
    make_lora(lively_model_dir, outside, 4, ["q_proj"], seed=9)
    with pytest.raises(AdapterError, match=r"'\.\.'"):
        registry.add("esc1", "qv8/../../outside")
    with pytest.raises(AdapterError, match="outside the allowed"):
        registry.add("esc2", str(outside))
    link = adapter_root / "sneaky"
    os.symlink(outside, link)
    try:
        with pytest.raises(AdapterError, match="outside the allowed"):
            registry.add("esc3", "sneaky")
        with pytest.raises(AdapterError, match="outside the allowed"):
            registry.add("esc4", str(link))
    finally:
        link.unlink()
    assert registry.add("fine", str(adapter_root / "qv8")).kind == "lora"  # absolute, inside: allowed
    with pytest.raises(AdapterError, match="already loaded"):
        registry.add("fine", "qv8")


def test_adapters_for_another_model_are_refused(base, adapter_root, tiny_model_dir, tmp_path):
    from posttrain.model.tiny import write_tiny_model

    registry = make_engine(base, adapter_root).registry
    registry.roots.append(tmp_path.resolve())
    small = write_tiny_model(tmp_path / "small-base", size="small")
    make_lora(small, tmp_path / "for-small", 4, ["q_proj", "v_proj"], seed=1)
    with pytest.raises(AdapterError, match="num_hidden_layers|hidden_size"):
        registry.add("for-small", "for-small")
    # the same adapter when its base folder is not on this machine: the shapes still catch it
    config = json.loads((tmp_path / "for-small" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/unknown-model"
    (tmp_path / "for-small" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="different base model"):
        registry.add("for-small", "for-small")
    make_lora(tiny_model_dir, tmp_path / "dora", 4, ["q_proj"], seed=1, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        registry.add("dora", "dora")
    make_lora(tiny_model_dir, tmp_path / "embed", 4, ["embed_tokens"], seed=1)
    with pytest.raises(AdapterError, match="does not fit"):
        registry.add("embed", "embed")


def test_engine_refuses_unsupported_models(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from posttrain.errors import ConfigError
    from posttrain.model.tiny import build_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="model types"):
        Engine(model, build_tokenizer())


def test_lively_copy_differs_from_source(tiny_model_dir, tmp_path):
    """Guard for the fixtures: the lively model's greedy output must not be one repeated token."""
    from posttrain.model.loading import load_model, load_tokenizer

    path = make_lively(tiny_model_dir, tmp_path / "l")
    tok = load_tokenizer(str(path))
    out = reference_greedy(load_model(str(path), device=CPU).eval(), tok("hello")["input_ids"], 12)
    assert len(set(out)) > 4


@pytest.mark.parametrize("file,content,message", [
    ("adapter_model.safetensors", "not safetensors", "cannot read safetensors"),
    ("adapter_config.json", '{"peft_type": "LORA", "lora_alpha": "lots"}',
     "lora_alpha must be a positive number"),  # PEFT raised ValueError
    ("adapter_config.json", "{ not json", "not valid JSON"),
])
def test_an_adapter_that_breaks_after_registration_fails_only_its_request(base, prompts, adapter_root, tmp_path,
                                                                          file, content, message):
    import shutil

    engine = make_engine(base, adapter_root)
    engine.registry.roots.append(tmp_path.resolve())
    shutil.copytree(adapter_root / "qv8", tmp_path / "fragile")
    fragile = engine.registry.add("fragile", "fragile")
    (tmp_path / "fragile" / file).write_text(content)
    with pytest.raises(AdapterError, match=f"'fragile'.*{message}"):  # what the server checks before the engine
        engine.registry.read_weights(fragile)
    bad = Request(prompts[0], SamplingParams(max_new_tokens=3, ignore_eos=True), fragile)
    good = Request(prompts[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.add(bad)
    engine.add(good)
    outs = {}
    while engine.has_work():
        outs.update({o.request_id: o for o in engine.step()})
    assert outs[bad.request_id].finish_reason == "error" and message in outs[bad.request_id].error
    assert "fragile" in outs[bad.request_id].error and str(tmp_path.resolve()) not in outs[bad.request_id].error
    assert outs[good.request_id].finish_reason == "length" and len(outs[good.request_id].token_ids) == 3
    assert engine.registry.resident() == [] and not engine.registry._pins


def test_generate_on_a_peft_wrapped_model_keeps_the_adapter(base, prompts, adapter_root, lively_model_dir):
    """A model still wrapped by PEFT (adapter training, `chat --adapter`): generate() runs it with the adapter
    merged (or hands what it cannot merge to transformers), never the base alone."""
    from peft import PeftModel

    from posttrain.generation.texts import generate
    from posttrain.model.loading import load_model

    _, tok = base
    wrapped = PeftModel.from_pretrained(load_model(str(lively_model_dir), device=CPU), str(adapter_root / "qv8")).eval()
    text = generate(wrapped, tok, [prompts[2]], max_new_tokens=6)[0]
    expected = merged_reference(lively_model_dir, adapter_root / "qv8", prompts[2], 6)
    expected = expected[:expected.index(tok.eos_token_id)] if tok.eos_token_id in expected else expected
    assert text == tok.decode(expected, skip_special_tokens=True)


def test_adapter_tokenizers(base, adapter_root, tmp_path):
    import shutil

    _, tok = base
    engine = make_engine(base, adapter_root)
    engine.registry.roots.append(tmp_path.resolve())
    shutil.copytree(adapter_root / "qv8", tmp_path / "own-tok")
    tok.save_pretrained(tmp_path / "own-tok")
    adapter = engine.registry.add("own-tok", "own-tok")
    assert adapter.tokenizer is not tok and adapter.tokenizer.get_vocab() == tok.get_vocab()
    assert adapter.chat_template == tok.chat_template
    shutil.copytree(adapter_root / "qv8", tmp_path / "big-tok")
    bigger = type(tok).from_pretrained(tmp_path / "own-tok")
    bigger.add_tokens([f"<new{i}>" for i in range(engine.dims.vocab - len(bigger) + 1)])
    bigger.save_pretrained(tmp_path / "big-tok")
    with pytest.raises(AdapterError, match="resized embeddings"):
        engine.registry.add("big-tok", "big-tok")


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_supported_architectures_match_transformers(arch, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (1.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1) + (p.dim() == 1))
    engine = Engine(model, tiny_tokenizer)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(model, prompt, 10)


def test_row_uniforms_are_uniform_and_depend_on_seed_and_counter_alone():
    n = 200_000
    u = row_uniforms(list(range(n)), [3] * n)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert (counts - n / 20).abs().max() < 5 * (n / 20) ** 0.5  # ~5 sigma
    successive = row_uniforms([7] * n, list(range(n)))  # one row's draws over its tokens
    assert abs(torch.corrcoef(torch.stack([successive[:-1], successive[1:]]))[0, 1]) < 0.01
    alone = row_uniforms([123456789012345], [5])
    batched = row_uniforms([1, 123456789012345, -4, 2 ** 70], [9, 5, 0, 1])  # any Python int is a seed
    assert alone[0] == batched[1]


def _peft(lively_model_dir, config):
    from peft import get_peft_model

    from posttrain.model.loading import load_model

    model = get_peft_model(load_model(str(lively_model_dir), device=CPU), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: a no-op adapter would hide a skipped delta
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_a_lora_model_runs_merged_and_follows_its_adapter_after_refresh(lively_model_dir, base, prompts):
    # An RL actor with LoRA: the engine generates from merged copies; refresh() picks up the trained A and B.
    from peft import LoraConfig

    _, tok = base
    actor = _peft(lively_model_dir, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                               target_modules=["q_proj", "v_proj", "gate_proj", "lm_head"]))
    engine = Engine(actor, tok, max_batch_size=4, fuse_weights=False)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    first = [o.token_ids for o in engine.generate(prompts[:4], params)]
    assert first == [reference_greedy(actor, p, 10) for p in prompts[:4]]
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
    expected = [reference_greedy(actor, p, 10) for p in prompts[:4]]
    assert expected != first
    assert [o.token_ids for o in engine.generate(prompts[:4], params)] == first  # a snapshot until refreshed
    engine.weights.refresh()
    assert [o.token_ids for o in engine.generate(prompts[:4], params)] == expected
    with actor.disable_adapter():  # the reference pass of RL: the base alone
        engine.weights.refresh()
        assert [o.token_ids for o in engine.generate(prompts[:1], params)] == [reference_greedy(actor, prompts[0], 10)]


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["q_proj"], use_dora=True), "LoRA variant"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens is wrapped by PEFT"),
    (dict(target_modules=["q_proj"], modules_to_save=["norm"]), "model.norm is wrapped by PEFT"),
])
def test_lora_models_the_merge_would_not_reproduce_are_refused(lively_model_dir, base, config, message):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match=message):
        Engine(_peft(lively_model_dir, LoraConfig(r=4, **config)), base[1])


def test_prompt_learning_models_are_refused(lively_model_dir, base):
    from peft import PromptTuningConfig, get_peft_model

    from posttrain.model.loading import load_model

    model = get_peft_model(load_model(str(lively_model_dir), device=CPU),
                           PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="PROMPT_TUNING"):
        Engine(model, base[1])
