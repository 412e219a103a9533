"""The memory plan (train/memory_plan.py over model/shapes.py): parameters counted from config.json equal a real
model's (and what each finetuning type trains, PEFT's own count); a 7B Llama's per-rank bytes under one process,
DDP, FSDP2 and ZeRO equal the arithmetic worked by hand here; `posttrain plan` prints the table and exits 0, or 2
naming the cheapest fix; a run that cannot fit its memory_budget_gb is refused before its output folder exists."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch

from conftest import sft_overrides
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.model.shapes import model_shapes, trained_params
from posttrain.train.memory_plan import Budget, GiB, budget, plan_memory, shortfalls, verdict

# A Llama-2-7B-shaped config.json (no weights: the plan reads nothing else).
H, I, L, V = 4096, 11008, 32, 32000
LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
            "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": V,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
LAYER = 4 * H * H + 3 * H * I + 2 * H  # q, k, v, o; gate, up, down; two norms
ROOT = 2 * V * H + H  # embeddings, lm_head, final norm
P = ROOT + L * LAYER
ROWS, TOKENS = 1, 2048
ACT_FP32 = ROWS * TOKENS * L * 4 * (9 * H + 2 * H + 4 * I)  # 9H + 2K + 4I values per token and layer, fp32
ACT_HALF = ROWS * TOKENS * L * (26 * H + 4 * H + 8 * I)  # autocast: the norms' 4H in fp32, the rest half
LOGITS = ROWS * TOKENS * V * 4


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-7b")
    (folder / "config.json").write_text(json.dumps(LLAMA_7B))
    return folder


def _config(model, stage: str = "sft", **keys):
    base = {"model_name_or_path": model, "dataset": "unused.jsonl", "output_dir": "unused",
            "per_device_train_batch_size": ROWS, "cutoff_len": TOKENS, **keys}
    if stage in ("ppo", "grpo"):
        base.setdefault("reward_funcs", "[exact_match]")
    return load_config(stage, None, [f"{k}={v}" for k, v in base.items()])


def _parts(plan) -> dict[str, int]:
    return {p.what: p.bytes for p in plan.parts}


# -- counting -------------------------------------------------------------------------------------------------

def _small_configs():
    from transformers import MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    return {"qwen2": Qwen2Config(**small), "qwen3-bias-headdim": Qwen3Config(**small, head_dim=32, attention_bias=True),
            "mistral-untied": MistralConfig(**small, tie_word_embeddings=False),
            "phi3 (meta device)": Phi3Config(**small)}


@pytest.mark.parametrize("name", ["tiny", *_small_configs()])
def test_parameters_counted_from_config_json_are_the_real_models(name, tiny_model_dir, tmp_path):
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = tiny_model_dir if name == "tiny" else tmp_path
    if name != "tiny":
        _small_configs()[name].save_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    as_reward_model = copy.deepcopy(config)
    as_reward_model.num_labels = 1
    for score_head, real in ((False, AutoModelForCausalLM.from_config(config)),
                             (True, AutoModelForSequenceClassification.from_config(as_reward_model))):
        shapes = model_shapes(str(folder), score_head=score_head)
        assert shapes.params == {n: tuple(p.shape) for n, p in real.named_parameters()}
        assert shapes.total == sum(p.numel() for p in real.parameters())
        assert shapes.layer_numel == sum(p.numel() for p in real.model.layers[0].parameters())
    assert shapes.counted == ("a meta-device model" if "meta" in name else "config.json shapes")


TRAINED = [
    {"finetuning_type": "lora"},
    {"finetuning_type": "lora", "lora_rank": 4, "lora_target": "[q_proj,v_proj]", "use_dora": "true",
     "modules_to_save": "[norm]"},
    {"finetuning_type": "freeze", "freeze_trainable_layers": 2, "freeze_trainable_modules": "mlp",
     "freeze_extra_modules": "[embed_tokens]"},
    {"finetuning_type": "ptuning", "num_virtual_tokens": 5},
    {"finetuning_type": "ptuning", "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 32},
    {"finetuning_type": "prompt_tuning"},
    {"finetuning_type": "prefix_tuning"},
    {"finetuning_type": "prefix_tuning", "prefix_projection": "true", "encoder_hidden_size": 48},
]


@pytest.mark.parametrize("keys", TRAINED, ids=lambda k: " ".join(f"{a}={b}" for a, b in k.items()))
def test_what_each_finetuning_type_trains_is_counted_as_peft_counts_it(keys, tiny_model_dir):
    from posttrain.model.adapters import apply_finetuning, count_parameters
    from posttrain.model.loading import load_model

    config = _config(tiny_model_dir, **keys)
    model = apply_finetuning(load_model(str(tiny_model_dir), device=torch.device("cpu")), config)
    trainable, total = count_parameters(model)
    shapes = model_shapes(str(tiny_model_dir))
    counted = trained_params(shapes, config)
    assert (counted.trainable, shapes.total + counted.added) == (trainable, total)


def test_a_lora_reward_model_trains_its_adapter_and_a_copy_of_its_head(tiny_model_dir):
    from posttrain.model.adapters import apply_finetuning, count_parameters
    from posttrain.model.reward import load_reward_model

    config = _config(tiny_model_dir, "rm", finetuning_type="lora")
    model = apply_finetuning(load_reward_model(str(tiny_model_dir), device=torch.device("cpu")), config,
                             task_type="SEQ_CLS")
    trainable, total = count_parameters(model)
    shapes = model_shapes(str(tiny_model_dir), score_head=True)
    counted = trained_params(shapes, config, score_head=True)
    assert (counted.trainable, shapes.total + counted.added) == (trainable, total)


def test_lora_on_a_7b_llama_trains_the_well_known_count(llama_7b):
    counted = trained_params(model_shapes(str(llama_7b)), _config(llama_7b, finetuning_type="lora"))
    per_layer = 4 * 8 * (H + H) + 2 * 8 * (H + I) + 8 * (I + H)  # rank 8 on q, k, v, o; gate, up; down
    assert counted.trainable == L * per_layer == 19_988_480
    assert model_shapes(str(llama_7b)).total == P == 6_738_415_616


# -- the per-rank arithmetic ------------------------------------------------------------------------------------

def test_one_process_holds_everything(llama_7b):
    plan = plan_memory(_config(llama_7b))
    assert _parts(plan) == {"weights (fp32)": 4 * P, "gradients": 4 * P, "AdamW moments (2 x fp32)": 8 * P,
                            f"activations ({ROWS} rows x {TOKENS} tokens)": ACT_FP32, "logits (fp32)": LOGITS}
    assert plan.on("device") == 16 * P + ACT_FP32 + LOGITS and plan.load == 4 * P


def test_ddp_holds_everything_on_every_rank_and_its_buckets(llama_7b):
    plan = plan_memory(_config(llama_7b), world=8)
    assert plan.strategy == "DDP over 8 processes"
    assert plan.on("device") == 16 * P + 4 * P + ACT_FP32 + LOGITS  # + the reducer's flat copy of the gradients
    assert _parts(plan)["DDP reduction buckets"] == 4 * P


def test_fsdp_full_shard_divides_weights_gradients_and_adam_and_gathers_two_layers(llama_7b):
    plan = plan_memory(_config(llama_7b, fsdp="full_shard"), world=8)
    assert plan.strategy == "FSDP2 full_shard over 8 processes"
    gathered = (ROOT + 2 * LAYER) * 4  # fp32: no bf16
    assert _parts(plan) == {"weights (fp32)": 4 * P // 8, "gradients": 4 * P // 8,
                            "AdamW moments (2 x fp32)": 8 * P // 8,
                            "gathered for compute (root + 2 layers)": gathered,
                            f"activations ({ROWS} rows x {TOKENS} tokens)": ACT_FP32, "logits (fp32)": LOGITS}
    assert plan.load == 4 * P  # every rank loads the model whole before sharding it
    # with bf16 the shards stay fp32 and gather in bf16; no autocast copies, half activations
    bf16 = _parts(plan_memory(_config(llama_7b, fsdp="full_shard", bf16="true"), world=8))
    assert bf16["gathered for compute (root + 2 layers)"] == (ROOT + 2 * LAYER) * 2
    assert bf16[f"activations ({ROWS} rows x {TOKENS} tokens)"] == ACT_HALF
    assert bf16["weights (fp32)"] == 4 * P // 8 and not any("autocast" in k for k in bf16)


def test_hybrid_shard_divides_within_a_node_and_offload_moves_shards_to_the_host(llama_7b):
    hybrid = plan_memory(_config(llama_7b, fsdp="hybrid_shard"), world=16, local_world=8)
    assert _parts(hybrid)["weights (fp32)"] == 4 * P // 8
    offload = plan_memory(_config(llama_7b, fsdp="full_shard offload"), world=8)
    assert offload.on("host") == 16 * P // 8
    assert offload.on("device") == (ROOT + 2 * LAYER) * 4 + ACT_FP32 + LOGITS


def test_zero2_with_bf16_holds_half_weights_and_divides_gradients_master_and_adam(llama_7b, tmp_path):
    ds = tmp_path / "ds_z2_config.json"
    ds.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}))
    plan = plan_memory(_config(llama_7b, deepspeed=ds, bf16="true"), world=8)
    assert plan.strategy == "DeepSpeed ZeRO-2 over 8 processes"
    assert _parts(plan) == {"weights (bf16/fp16)": 2 * P, "gradients": 2 * P // 8,
                            "fp32 master weights": 4 * P // 8, "AdamW moments (2 x fp32)": 8 * P // 8,
                            f"activations ({ROWS} rows x {TOKENS} tokens)": ACT_HALF, "logits (fp32)": LOGITS}


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16 autocast"])
def test_the_activation_estimate_is_what_autograd_keeps_for_a_llama_layer(half):
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.model.shapes import _llama_shapes
    from posttrain.train.memory_plan import activation_bytes

    def kept(layers: int) -> int:
        """Bytes autograd saves for the backward of the decoder, weights and autocast's copies of them left out."""
        config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64)
        model = LlamaForCausalLM(config).model
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights and not (t.dtype == torch.bfloat16 and tuple(t.shape) in shapes):
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            model(input_ids=torch.randint(0, 64, (2, 96)))
        return sum(saved.values())

    per_layer = (kept(4) - kept(2)) / 2  # the embeddings and the final norm cancel out
    shapes = _llama_shapes(LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64), False)
    estimate = activation_bytes(shapes, 2, 96, half=half, checkpointing=False, residual_bytes=4)
    assert 0.85 < per_layer / estimate < 1.2


def test_gradient_checkpointing_keeps_each_layers_input_and_one_layer(llama_7b):
    plan = plan_memory(_config(llama_7b, gradient_checkpointing="true"))
    assert _parts(plan)[f"activations ({ROWS} rows x {TOKENS} tokens, checkpointed)"] == \
        ROWS * TOKENS * (L * H * 4 + 4 * (9 * H + 2 * H + 4 * I))


def test_rl_holds_the_reference_critic_and_a_whole_rollout_copy_when_sharded(tiny_model_dir):
    shapes = model_shapes(str(tiny_model_dir))
    critic = model_shapes(str(tiny_model_dir), score_head=True).total
    plan = plan_memory(_config(tiny_model_dir, "ppo", fsdp="full_shard"), world=2)
    parts = _parts(plan)
    assert parts["reference model (fp32, whole)"] == 4 * shapes.total
    assert parts["critic weights (fp32)"] == math.ceil(4 * critic / 2)
    assert parts["critic AdamW moments (2 x fp32)"] == math.ceil(8 * critic / 2)
    assert parts["rollout copy of the actor (fp32, whole)"] == 4 * shapes.total
    sequences, length = 8, TOKENS + 64  # rollout_batch_size x 1 completion (gae) of cutoff_len + 64 tokens
    assert parts[f"rollout KV cache ({sequences} x {length} tokens)"] == sequences * length * 4 * 2 * 64 * 4
    assert plan.load == 4 * shapes.total * 3 + 4 * critic  # actor, reference, rollout copy and critic, whole
    lora = _parts(plan_memory(_config(tiny_model_dir, "grpo", finetuning_type="lora")))
    assert lora["reference (the actor's base, adapter disabled)"] == 0 and not any("critic" in k for k in lora)


@pytest.mark.parametrize("layout", [{}, {"ray_trainer_ranks": 2, "ray_separate_roles": True}])
def test_roles_on_gpus_of_their_own_are_not_counted_on_the_trainer(layout, tiny_model_dir):
    placed = dict(placement="ray", ray_num_gpus_per_role=1, **layout)
    plan = plan_memory(_config(tiny_model_dir, "ppo", fsdp="full_shard", **placed), world=2)
    parts = _parts(plan)
    assert not any(k.startswith(("reference", "rollout KV", "reward model")) for k in parts)
    assert "rollout copy of the actor (fp32, whole)" in parts and "critic weights (fp32)" in parts  # the trainer's
    assert "placement: ray: rollout, reference on GPUs of their own, not counted here" in plan.notes
    # On CPU the roles' actors take this machine's memory: counted; and colocated, each rank holds every role.
    for where in (dict(placed, ray_num_gpus_per_role=0), dict(placement="ray", ray_trainer_ranks=2)):
        assert "reference model (fp32, whole)" in _parts(plan_memory(_config(tiny_model_dir, "ppo", **where), world=2))


def test_rollouts_on_vllm_count_what_vllm_takes_instead_of_the_engine_cache(tiny_model_dir):
    shapes = model_shapes(str(tiny_model_dir))
    engine = _parts(plan_memory(_config(tiny_model_dir, "grpo", device="cpu")))
    assert any(k.startswith("rollout KV cache") for k in engine)
    # On CPU: vLLM's own process on this machine, the model and the KV cache posttrain gives it.
    cpu = _parts(plan_memory(_config(tiny_model_dir, "grpo", device="cpu", rollout_backend="vllm")))
    assert cpu["vLLM's process: the model (fp32) and a 1 GiB KV cache"] == 4 * shapes.total + 2 ** 30
    assert not any(k.startswith("rollout KV cache") for k in cpu)
    # On a GPU (planned here from memory_budget_gb): its share of the GPU, held all the time; or, asleep while the
    # actor trains, taken back beside the models between batches: the models plus the larger of the two.
    gpu = dict(device="cuda", rollout_backend="vllm", memory_budget_gb=80, vllm_gpu_memory_utilization=0.25)
    awake = plan_memory(_config(tiny_model_dir, "grpo", **gpu))
    share = _parts(awake)["vLLM (0.25 of the GPU: its weights and KV cache)"]
    assert share == 20 * 2 ** 30
    asleep = plan_memory(_config(tiny_model_dir, "grpo", vllm_enable_sleep_mode=True, **gpu))
    batch = awake.on("device") - awake.on("device", with_batch=False)
    assert asleep.on("device", with_batch=False) == awake.on("device", with_batch=False)  # it wakes beside them
    assert asleep.on("device") == awake.on("device", with_batch=False) - share + max(share, batch)
    lora = plan_memory(_config(tiny_model_dir, "grpo", vllm_enable_sleep_mode=True, finetuning_type="lora", **gpu))
    assert _parts(lora)["vLLM asleep: the base model (fp32)"] == 4 * shapes.total  # level 1 keeps it on the host
    # Its share and the models fit, the batch beside them does not: asleep while the actor trains, it fits.
    models, act = awake.on("device", with_batch=False) - share, batch
    room = 2 ** 30  # a budget B with models + share + batch > B >= models + share, and share >= batch
    tight = _config(tiny_model_dir, "grpo", **{**gpu, "memory_budget_gb": room / 2 ** 30,
                                               "vllm_gpu_memory_utilization": (room - models - act / 2) / room})
    refusal, warning = verdict(tight, plan_memory(tight), budget(tight, 1), None, 1)
    assert refusal is None and "it fits with vllm_enable_sleep_mode: true" in warning, warning
    full = _config(tiny_model_dir, "grpo", **{**gpu, "memory_budget_gb": 1, "vllm_gpu_memory_utilization": 1.0})
    refusal, _ = verdict(full, plan_memory(full), budget(full, 1), None, 1)
    assert "it fits with vllm_enable_sleep_mode" not in refusal  # asleep it still wakes beside the models
    assert refusal.endswith("or a lower vllm_gpu_memory_utilization")
    auto = _config(tiny_model_dir, "grpo", device="cuda", rollout_backend="auto", memory_budget_gb=80,
                   vllm_python=sys.executable, finetuning_type="lora", use_dora=True)
    assert any(k.startswith("rollout KV cache") for k in _parts(plan_memory(auto)))  # auto: DoRA stays on the engine


def test_a_plan_fits_a_budget_by_its_peak():
    from posttrain.train.memory_plan import MemoryPlan, Part

    plan = MemoryPlan("sft", "one process", 1, 1, 1, [Part("weights", 6 * GiB), Part("offloaded", 3 * GiB, "host")],
                      load=8 * GiB)
    assert shortfalls(plan, Budget(8 * GiB, 4 * GiB, False, "x")) == []
    assert shortfalls(plan, Budget(8 * GiB, 2 * GiB, False, "x"))  # the host part does not fit
    assert shortfalls(plan, Budget(8 * GiB, 8 * GiB, True, "x"))  # on a CPU both share the 8 GiB: 9 needed
    assert shortfalls(plan, Budget(7 * GiB, 4 * GiB, False, "x"))  # loading whole needs 8


# -- the command and the run -------------------------------------------------------------------------------------

def test_plan_command_prints_the_table_and_exits_0_when_it_fits(llama_7b, capsys):
    code = main(["plan", f"model_name_or_path={llama_7b}", "fsdp=full_shard", "bf16=true", "nproc_per_node=8",
                 "memory_budget_gb=80", "dataset=d.jsonl", "cutoff_len=1024"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FSDP2 full_shard over 8 processes" in out and "AdamW moments" in out and "fits:" in out


def test_plan_command_exits_2_naming_the_cheapest_fix(llama_7b, tmp_path, capsys):
    config = tmp_path / "dpo.yaml"
    config.write_text(f"stage: dpo\nmodel_name_or_path: {llama_7b}\ndataset: pairs.jsonl\noutput_dir: out\n"
                      "bf16: true\nmemory_budget_gb: 80\n")
    code = main(["plan", str(config), "--nproc-per-node", "8"])
    captured = capsys.readouterr()
    assert code == 2
    assert "memory plan for dpo" in captured.out and "DDP over 8 processes" in captured.out
    assert "the models alone take" in captured.err and "it fits with fsdp: full_shard" in captured.err
    code = main(["plan", str(config)])  # one process: no sharding, and checkpointing alone is not enough
    assert code == 2 and "it fits with finetuning_type: lora" in capsys.readouterr().err


def test_plan_command_names_the_stage_a_file_without_one_is_for(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "rl.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: p.jsonl\nnum_generations: 8\nkl_coef: 0.04\n")
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no `stage:` key" in err, err
    # keys both RL stages take: either may be meant
    assert "keys are for ppo or grpo: add `stage: ppo` to it (or pass --stage ppo), or another of these" in err
    assert main(["plan", str(config), "--stage", "grpo"]) == 0
    assert "memory plan for grpo" in capsys.readouterr().out
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: p.jsonl\npref_beta: 0.1\npref_loss: ipo\n")
    assert main(["plan", str(config)]) == 2  # pref_beta is DPO's and KTO's, pref_loss DPO's alone
    assert "keys are for dpo: add `stage: dpo`" in capsys.readouterr().err


def test_plan_command_warns_when_only_the_longest_batches_would_not_fit(tiny_model_dir, capsys):
    # the models take 13.6 MB (weights, gradients, AdamW), a batch of 8 x 64 tokens 25 MB more
    code = main(["plan", f"model_name_or_path={tiny_model_dir}", "per_device_train_batch_size=8", "cutoff_len=64",
                 "memory_budget_gb=0.03"])
    out = capsys.readouterr().out
    assert code == 0
    assert "warning: memory plan: a micro-batch of 8 rows x 64 tokens takes" in out
    assert "it fits with gradient_checkpointing: true" in out and "fits without the batch:" in out


def test_a_run_over_its_budget_is_refused_before_its_output_folder_exists(tiny_model_dir, task_data, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    code = main(["sft", *sft_overrides(tiny_model_dir, task_data, out, memory_budget_gb=0.01)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "memory plan: the models alone take" in err and "it fits with finetuning_type: lora" in err


def test_a_run_that_fits_logs_its_plan_first(tiny_model_dir, task_data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=1, memory_budget_gb=1)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("posttrain")]
    assert lines[0].startswith("memory plan for sft: 847,104 parameters")
    assert any(line.startswith("memory: 1.00 GiB per rank (memory_budget_gb: 1)") for line in lines)
