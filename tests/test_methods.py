"""Each method's value on fixed tensors equals an independent implementation of its published formula, written
here with explicit loops in float64 (not the method's code); gradients reach the student and the connectors,
never the teacher or the reference."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from kdcli.errors import KdcliError
from kdcli.training.engine import loss_terms, step_inputs
from kdcli.training.methods import REGISTRY, Outputs, StepInputs
from kdcli.training.pipeline import Models, check_plan, stage_plan
from kdcli.training.recipe import validate_recipe
from kdcli.training.sources import Batch

B, C = 6, 5
ATOL = 1e-6


def make(name: str, **params):
    method = REGISTRY[name](REGISTRY[name].Params(method=name, **params))
    return method.double()


def step(z_s, labels, z_t=None, student_features=None, teacher_features=None, epoch=0) -> StepInputs:
    teacher = Outputs(z_t, teacher_features or {})
    return StepInputs(Outputs(z_s, student_features or {}), labels, {"teacher": teacher}, epoch)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    z_s = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    z_t = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    return z_s, z_t, labels


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def ce(z: list[float], y: int) -> float:
    return -math.log(softmax(z)[y])


# ---------------------------------------------------------------- response


def test_dkd_matches_the_published_formula(logits):
    z_s, z_t, labels = logits
    alpha, beta, T, warmup, epoch = 1.0, 8.0, 4.0, 20, 4
    total = 0.0
    for i in range(B):
        y = int(labels[i])
        s, t = softmax([v / T for v in z_s[i].tolist()]), softmax([v / T for v in z_t[i].tolist()])
        tckd = kl([t[y], 1 - t[y]], [s[y], 1 - s[y]]) * T**2
        mask = [1000.0 if c == y else 0.0 for c in range(C)]
        s2 = softmax([v / T - m for v, m in zip(z_s[i].tolist(), mask)])
        t2 = softmax([v / T - m for v, m in zip(z_t[i].tolist(), mask)])
        nckd = kl(t2, s2) * T**2
        total += alpha * tckd + beta * nckd
    expected = total / B * min((epoch + 1) / warmup, 1.0)  # epoch is 0-based: epoch 4 = 5th epoch -> 5/20
    method = make("dkd", alpha=alpha, beta=beta, temperature=T, warmup=warmup)
    got = method(step(z_s, labels, z_t, epoch=epoch)).mean()
    assert abs(got.item() - expected) < ATOL
    late = method(step(z_s, labels, z_t, epoch=40)).mean()
    assert abs(late.item() - total / B) < ATOL


def standardised_kd(z_s, z_t, labels, ce_weight, kd_weight, T) -> float:
    """Sun et al. 2024: ce_weight·CE + kd_weight·T²·KL on (z − mean) / (1e-7 + unbiased std), batch mean."""

    def standardise(row: list[float]) -> list[float]:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        return [(v - mean) / (1e-7 + std) for v in row]

    expected = 0.0
    for i in range(B):
        s = softmax([v / T for v in standardise(z_s[i].tolist())])
        t = softmax([v / T for v in standardise(z_t[i].tolist())])
        expected += ce_weight * ce(z_s[i].tolist(), int(labels[i])) + kd_weight * T**2 * kl(t, s)
    return expected / B


def test_kd_std_defaults_are_the_papers_cifar_setting(logits):
    """0.1·CE + 9·KD at T=2 on standardised logits (Sun et al. 2024), not 0.1·CE + 0.9·KD."""
    z_s, z_t, labels = logits
    got = make("kd_std")(step(z_s, labels, z_t)).mean()
    assert abs(got.item() - standardised_kd(z_s, z_t, labels, 0.1, 9.0, 2.0)) < ATOL


def test_kd_std_matches_the_published_formula_and_reads_older_recipes(logits):
    z_s, z_t, labels = logits
    got = make("kd_std", ce_weight=0.3, kd_weight=4.0, temperature=3.0)(step(z_s, labels, z_t)).mean()
    assert abs(got.item() - standardised_kd(z_s, z_t, labels, 0.3, 4.0, 3.0)) < ATOL
    # a recipe written by an earlier kdcli says alpha: alpha·CE + (1 − alpha)·T²·KL, as it meant then
    legacy = make("kd_std", alpha=0.3, temperature=2.0)(step(z_s, labels, z_t)).mean()
    assert abs(legacy.item() - standardised_kd(z_s, z_t, labels, 0.3, 0.7, 2.0)) < ATOL


# ---------------------------------------------------------------- feature


def fixed_maps(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fitnets_matches_mse_of_connector_output_over_two_pairs():
    f_s1, f_t1 = fixed_maps((B, 3, 4, 4), 1), fixed_maps((B, 5, 2, 2), 2)  # student map larger: pooled
    f_s2, f_t2 = fixed_maps((B, 4), 3), fixed_maps((B, 6), 4)  # penultimate vectors: linear + BN
    pairs = [{"student": {"feature": 1}, "teacher": {"feature": 2}}, {"student": "penultimate", "teacher": "penultimate"}]
    method = make("fitnets", pairs=pairs)
    method.setup({"student": {"feature:1": f_s1.shape, "penultimate": f_s2.shape},
                  "teacher": {"feature:2": f_t1.shape, "penultimate": f_t2.shape}})
    method.double().train()
    g = torch.Generator().manual_seed(5)
    for p in method.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    inputs = step(torch.zeros(B, C), torch.zeros(B, dtype=torch.long),
                  student_features={"feature:1": f_s1, "penultimate": f_s2},
                  teacher_features={"feature:2": f_t1, "penultimate": f_t2})
    got = method(inputs).mean().item()

    conv_w = method.connectors[0][0].weight[:, :, 0, 0].detach().tolist()  # [5, 3]
    bn1, lin, bn2 = method.connectors[0][1], method.connectors[1][0].weight.detach().tolist(), method.connectors[1][1]

    def batchnorm(values, gamma, beta):  # values[i][c] over the batch (and positions), biased variance, train mode
        flat = [v for row in values for v in row]
        mean = sum(flat) / len(flat)
        var = sum((v - mean) ** 2 for v in flat) / len(flat)
        return mean, var

    # pair 1: 1x1 conv, BN over (B, H, W), 2x2 average pooling to the teacher's 2x2, MSE
    conv = [[[[sum(conv_w[o][c] * f_s1[i, c, h, w].item() for c in range(3)) for w in range(4)] for h in range(4)]
             for o in range(5)] for i in range(B)]
    total = 0.0
    for o in range(5):
        mean, var = batchnorm([[conv[i][o][h][w] for h in range(4) for w in range(4)] for i in range(B)], 0, 0)
        gamma, beta = bn1.weight[o].item(), bn1.bias[o].item()
        for i in range(B):
            for h in range(2):
                for w in range(2):
                    block = [conv[i][o][2 * h + a][2 * w + b] for a in range(2) for b in range(2)]
                    pooled = sum((v - mean) / math.sqrt(var + 1e-5) * gamma + beta for v in block) / 4
                    total += (pooled - f_t1[i, o, h, w].item()) ** 2 / (5 * 2 * 2)
    # pair 2: linear (no bias), BN1d, MSE
    proj = [[sum(lin[o][c] * f_s2[i, c].item() for c in range(4)) for o in range(6)] for i in range(B)]
    for o in range(6):
        mean, var = batchnorm([[proj[i][o]] for i in range(B)], 0, 0)
        gamma, beta = bn2.weight[o].item(), bn2.bias[o].item()
        for i in range(B):
            total += ((proj[i][o] - mean) / math.sqrt(var + 1e-5) * gamma + beta - f_t2[i, o].item()) ** 2 / 6
    assert abs(got - total / B) < ATOL


def test_at_matches_the_published_formula():
    f_s, f_t = fixed_maps((B, 3, 4, 4), 6), fixed_maps((B, 7, 2, 2), 7)  # student larger: pooled to 2x2
    p = 2.0

    def attention(f, i, size, pool):
        a = [sum(abs(sum(f[i, c, pool * h + a, pool * w + b].item() for a in range(pool) for b in range(pool))
                     / pool**2) ** p for c in range(f.shape[1])) / f.shape[1] for h in range(size) for w in range(size)]
        norm = math.sqrt(sum(v * v for v in a))
        return [v / norm for v in a]

    expected = sum(
        sum((a - b) ** 2 for a, b in zip(attention(f_s, i, 2, 2), attention(f_t, i, 2, 1))) / 4 for i in range(B)
    ) / B
    method = make("at", p=p, pairs=[{"student": {"feature": 1}, "teacher": {"feature": 1}}])
    inputs = step(torch.zeros(B, C), torch.zeros(B, dtype=torch.long),
                  student_features={"feature:1": f_s}, teacher_features={"feature:1": f_t})
    assert abs(method(inputs).mean().item() - expected) < ATOL


def test_at_refuses_token_features():
    method = make("at")
    with pytest.raises(KdcliError, match="not a spatial map"):
        method.setup({"student": {"feature:-3": torch.Size([2, 5, 64]), "feature:-2": torch.Size([2, 5, 64])},
                      "teacher": {"feature:-3": torch.Size([2, 8, 4, 4]), "feature:-2": torch.Size([2, 8, 2, 2])}})


# ---------------------------------------------------------------- relation


def relation_step(d_s=4, d_t=3, seed=8):
    e_s, e_t = fixed_maps((B, d_s), seed), fixed_maps((B, d_t), seed + 1)
    return e_s, e_t, step(torch.zeros(B, C), torch.zeros(B, dtype=torch.long),
                          student_features={"penultimate": e_s}, teacher_features={"penultimate": e_t})


def smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_the_published_formula():
    e_s, e_t, inputs = relation_step()

    def distances(e):
        d = [[math.dist(e[i].tolist(), e[j].tolist()) for j in range(B)] for i in range(B)]
        mean = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * B - B)
        return [[v / mean for v in row] for row in d]

    def angles(e):
        out = []
        for i in range(B):
            for j in range(B):
                for k in range(B):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = u.norm().item(), v.norm().item()
                    out.append((u @ v).item() / (max(nu, 1e-12) * max(nv, 1e-12)))
        return out

    ds, dt = distances(e_s), distances(e_t)
    dist = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(B) for j in range(B)) / B**2
    angle = sum(smooth_l1(a, b) for a, b in zip(angles(e_s), angles(e_t))) / B**3
    got = make("rkd", distance=25, angle=50)(inputs).mean().item()
    assert abs(got - (25 * dist + 50 * angle)) < ATOL


def test_sp_matches_the_published_formula():
    f_s, f_t = fixed_maps((B, 3, 2, 2), 10), fixed_maps((B, 5, 1, 1), 11)

    def gram(f):
        flat = f.flatten(1)
        g = [[(flat[i] @ flat[j]).item() for j in range(B)] for i in range(B)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = gram(f_s), gram(f_t)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(B) for j in range(B)) / B**2
    inputs = step(torch.zeros(B, C), torch.zeros(B, dtype=torch.long),
                  student_features={"feature:-1": f_s}, teacher_features={"feature:-1": f_t})
    assert abs(make("sp")(inputs).mean().item() - expected) < ATOL


def test_pkt_matches_the_published_formula():
    e_s, e_t, inputs = relation_step(seed=12)
    eps = 1e-7

    def distribution(e):
        rows = [[v / (math.sqrt(sum(x * x for x in r)) + eps) for v in r] for r in e.tolist()]
        sim = [[(sum(a * b for a, b in zip(rows[i], rows[j])) + 1) / 2 for j in range(B)] for i in range(B)]
        return [[v / sum(row) for v in row] for row in sim]

    s, t = distribution(e_s), distribution(e_t)
    expected = sum(t[i][j] * math.log((t[i][j] + eps) / (s[i][j] + eps)) for i in range(B) for j in range(B)) / B**2
    assert abs(make("pkt")(inputs).mean().item() - expected) < ATOL


# ---------------------------------------------------------------- gradients


ALL = [
    {"method": "ce"}, {"method": "kd"}, {"method": "dkd"}, {"method": "kd_std"},
    {"method": "fitnets", "pairs": [{"student": {"feature": -2}, "teacher": {"feature": -2}},
                                    {"student": {"feature": 1}, "teacher": {"feature": 2}}]},
    {"method": "at"}, {"method": "rkd"}, {"method": "sp"}, {"method": "pkt"},
    {"method": "fitnets", "pairs": [{"student": {"module": "conv_stem"}, "teacher": {"module": "layer1.0.bn2"}}]},
]


def test_gradients_reach_student_and_connectors_never_teacher_or_reference():
    torch.manual_seed(0)
    recipe = validate_recipe({"stages": [{"name": "all", "epochs": 1, "losses": ALL,
                                          "anchor": {"weighting": "tcp"}}]}, "test")
    student = timm.create_model("test_efficientnet", num_classes=10)
    teacher = timm.create_model("test_resnet", num_classes=10).eval().requires_grad_(False)
    models = Models(student, True, teacher, 32)
    (terms_,) = check_plan(recipe, models)
    plan = stage_plan(recipe, 0, terms_, models)  # the reference: a frozen copy of the student now
    reference = plan.sources["reference"].model
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8), 0, 0)
    terms = loss_terms(plan, step_inputs(plan, plan.needs(), batch))
    assert set(terms) == {"ce", "kd", "dkd", "kd_std", "fitnets#1", "fitnets#2", "at", "rkd", "sp", "pkt", "anchor"}
    for name, value in terms.items():  # each term alone reaches the student
        assert torch.isfinite(value), name
        if name == "ce":
            continue
        grads = torch.autograd.grad(value, list(student.parameters()), retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum().item() for g in grads if g is not None) > 0, name
    sum(terms.values()).backward()
    fitnets = next(t.method for t in terms_ if t.name == "fitnets#1")
    assert len(fitnets.connectors) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fitnets.parameters())
    assert fitnets in plan.trained()
    for frozen in (teacher, reference):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
