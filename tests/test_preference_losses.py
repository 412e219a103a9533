"""Each preference loss against its paper's formula, written out by hand on fixed log-probs, and
the batched (chosen + rejected in one pass) log-probs against one-sequence-at-a-time forwards."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import build_config, DPOConfig, KTOConfig
from posttrain.data.formats import DatasetSpec
from posttrain.data.pairs import collate_pairs, collate_unpaired, response_renderer, tokenize_pairs
from posttrain.train.kto import KTOObjective, kto_loss
from posttrain.train.dpo import PreferenceObjective, preference_loss
from posttrain.train.rm import bradley_terry_loss

# Three pairs: policy and reference summed log-probs, and response lengths.
PC, PR = [-12.0, -30.0, -7.5], [-15.0, -25.0, -9.0]
RC, RR = [-13.0, -28.0, -8.0], [-14.0, -27.0, -8.5]
NC, NR = [4, 10, 3], [5, 8, 3]
BETA = 0.2


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


def h(i):
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def run(kind, **kw):
    t = lambda v, dtype=torch.float64: torch.tensor(v, dtype=dtype)  # noqa: E731
    loss, rw, rl = preference_loss(kind, (t(PC), t(PR)), (t(NC, torch.long), t(NR, torch.long)), (t(RC), t(RR)),
                                   beta=BETA, **kw)
    return loss.tolist(), rw.tolist(), rl.tolist()


EXPECTED = {
    # DPO (Rafailov et al. 2023): -log σ(β h)
    "sigmoid": lambda i: -logsig(BETA * h(i)),
    # IPO (Azar et al. 2023), eq. 17 with per-token log-ratios: (h_avg - 1/(2β))²
    "ipo": lambda i: (((PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]) - 1 / (2 * BETA)) ** 2,
    # SLiC-HF hinge (Zhao et al. 2023): max(0, 1 - β h)
    "hinge": lambda i: max(0.0, 1 - BETA * h(i)),
    # SimPO (Meng et al. 2024): -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ), γ = 0.5
    "simpo": lambda i: -logsig(BETA * PC[i] / NC[i] - BETA * PR[i] / NR[i] - 0.5),
    # ORPO (Hong et al. 2024): NLL_w - λ log σ(log odds_w - log odds_l), P = exp(mean token log-prob)
    "orpo": lambda i: -PC[i] / NC[i] - BETA * logsig(
        math.log(math.exp(PC[i] / NC[i]) / (1 - math.exp(PC[i] / NC[i])))
        - math.log(math.exp(PR[i] / NR[i]) / (1 - math.exp(PR[i] / NR[i])))),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_loss_matches_its_paper(kind):
    loss, rw, rl = run(kind)
    assert loss == pytest.approx([EXPECTED[kind](i) for i in range(3)], rel=1e-9)
    if kind in ("simpo", "orpo"):  # reference-free: the reward is β times the mean token log-prob
        assert rw == pytest.approx([BETA * PC[i] / NC[i] for i in range(3)])
    else:
        assert rw == pytest.approx([BETA * (PC[i] - RC[i]) for i in range(3)])
        assert rl == pytest.approx([BETA * (PR[i] - RR[i]) for i in range(3)])


def test_conservative_and_robust_dpo_with_label_smoothing():
    eps = 0.1
    cdpo, _, _ = run("sigmoid", label_smoothing=eps)  # Mitchell 2023
    assert cdpo == pytest.approx([-(1 - eps) * logsig(BETA * h(i)) - eps * logsig(-BETA * h(i)) for i in range(3)])
    rdpo, _, _ = run("robust", label_smoothing=eps)  # Chowdhury et al. 2024
    assert rdpo == pytest.approx([((1 - eps) * -logsig(BETA * h(i)) - eps * -logsig(-BETA * h(i))) / (1 - 2 * eps)
                                  for i in range(3)])
    assert run("robust", label_smoothing=0.0)[0] == pytest.approx(run("sigmoid")[0])


def test_bco_pair_shifts_rewards_by_the_running_mean():
    delta = 0.05  # Jung et al. 2024: -log σ(r_w - δ) - log σ(-(r_l - δ)), r = β log-ratio
    loss, _, _ = run("bco_pair", bco_delta=delta)
    assert loss == pytest.approx([-logsig(BETA * (PC[i] - RC[i]) - delta) - logsig(-(BETA * (PR[i] - RR[i]) - delta))
                                  for i in range(3)])


def test_kto_matches_its_paper():
    # Ethayarajh et al. 2024: λ_D (1 - σ(β(r - z0))) for desirable, λ_U (1 - σ(β(z0 - r))) for undesirable.
    r, labels, z0, wd, wu = [0.3, -0.4, 1.2], [True, False, False], 0.25, 1.0, 1.5
    got = kto_loss(torch.tensor(r), torch.tensor(labels), torch.tensor(z0), BETA, wd, wu).tolist()
    want = [wd * (1 - sig(BETA * (r[0] - z0))), wu * (1 - sig(BETA * (z0 - r[1]))), wu * (1 - sig(BETA * (z0 - r[2])))]
    assert got == pytest.approx(want, rel=1e-6)


def test_bradley_terry_with_margin():
    got = bradley_terry_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.5]), torch.tensor([0.0, 1.0])).tolist()
    assert got == pytest.approx([-logsig(0.8), -logsig(-2.0)], rel=1e-6)


@pytest.fixture(scope="module")
def pair_batch(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("pairs") / "p.jsonl"
    path.write_text('{"prompt": "reverse 123", "chosen": "321", "rejected": "32"}\n'
                    '{"prompt": "reverse 4567 please", "chosen": "7654", "rejected": "7645111"}\n')
    from posttrain.data.preference_formats import load_preferences

    pairs, _ = load_preferences([DatasetSpec(path=str(path))])
    samples, _ = tokenize_pairs(pairs, response_renderer(tiny_tokenizer, None), cutoff_len=64)
    return samples


def _alone(model, seq) -> float:
    """log π(response | prompt) from one unpadded full-logits forward: the slow, obvious way."""
    ids = torch.tensor([seq.input_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return sum(logp[t, seq.input_ids[t + 1]].item() for t in range(len(seq.input_ids) - 1)
               if seq.labels[t + 1] != -100)


@pytest.mark.parametrize("kind", ["sigmoid", "orpo"])
def test_one_padded_pass_equals_separate_passes_and_adds_rpo(tiny_model_dir, tiny_tokenizer, pair_batch, kind):
    from posttrain.model.loading import load_model

    model = load_model(str(tiny_model_dir), device=torch.device("cpu"))
    for s in pair_batch:
        s.set_reference(-20.0, -21.0)
    config = build_config(DPOConfig, dict(model_name_or_path="m", output_dir="o", dataset="d", pref_loss=kind,
                                          pref_beta=BETA, pref_ftx=0.7))
    out = PreferenceObjective(model, config)(collate_pairs(pair_batch, tiny_tokenizer.pad_token_id))
    want = 0.0
    for s in pair_batch:
        c, r = _alone(model, s.chosen), _alone(model, s.rejected)
        nc, nr = (sum(1 for x in q.labels[1:] if x != -100) for q in s.sequences)
        if kind == "sigmoid":
            want += -logsig(BETA * ((c + 20.0) - (r + 21.0)))
        else:
            want += -c / nc - BETA * logsig(math.log(math.exp(c / nc) / (1 - math.exp(c / nc)))
                                            - math.log(math.exp(r / nr) / (1 - math.exp(r / nr))))
        want += 0.7 * (-c / nc)  # RPO: the NLL of chosen, per token
    assert out["loss_sum"].item() == pytest.approx(want, rel=1e-4)
    total, n = out["metrics"]["logps/chosen"]
    assert n == 2 and total.item() == pytest.approx(sum(_alone(model, s.chosen) for s in pair_batch), rel=1e-4)


def test_kto_kl_reference_point_is_one_estimate_over_the_whole_step(tiny_model_dir, tiny_tokenizer, pair_batch):
    from posttrain.data.pairs import UnpairedSample
    from posttrain.model.loading import load_model

    model = load_model(str(tiny_model_dir), device=torch.device("cpu"))
    rows = [UnpairedSample(pair_batch[0].chosen, True, pair_batch[1].rejected, ref=-20.0, ref_mismatched=-80.0),
            UnpairedSample(pair_batch[1].rejected, False, pair_batch[0].chosen, ref=-22.0, ref_mismatched=-90.0),
            UnpairedSample(pair_batch[1].chosen, True, pair_batch[0].rejected, ref=-21.0, ref_mismatched=-30.0)]
    config = build_config(KTOConfig, dict(model_name_or_path="m", output_dir="o", dataset="d", pref_beta=BETA,
                                          kto_rejected_weight=1.5))
    objective = KTOObjective(model, config)
    # One optimizer step of two micro-batches: z0 is the mean over all three rows' mismatched
    # log-ratios (Ethayarajh et al. 2024, eq. 8), not a mean per micro-batch.
    pad = tiny_tokenizer.pad_token_id
    micro = [collate_unpaired(rows[:2], pad), collate_unpaired(rows[2:], pad)]
    objective.begin_step(micro)
    mismatched = [_alone(model, r.mismatched) - r.ref_mismatched for r in rows]
    z0 = max(0.0, sum(mismatched) / 3)
    assert z0 > 0 and max(0.0, sum(mismatched[:2]) / 2) != pytest.approx(z0, rel=1e-3)  # per micro-batch would differ
    assert objective.kl.item() == pytest.approx(z0, rel=1e-4)
    assert not objective.kl.requires_grad  # a reference point, detached as the paper says

    out = objective(micro[0])
    r = [_alone(model, rows[0].sample) + 20.0, _alone(model, rows[1].sample) + 22.0]
    want = (1 - sig(BETA * (r[0] - z0))) + 1.5 * (1 - sig(BETA * (z0 - r[1])))
    assert out["loss_sum"].item() == pytest.approx(want, rel=1e-4)
    assert out["metrics"]["kl"][0].item() / 2 == pytest.approx(z0, rel=1e-4)
    assert out["loss_sum"].requires_grad
