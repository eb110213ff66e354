"""Losses against slow references written from METHOD.md 5.4 (invariants 20-22), the
criterion, and single-process == 2-rank gradients for the global-batch terms."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ncd.config import LossConfig
from ncd.train import dist as ncd_dist
from ncd.losses import (
    corrected_targets,
    info_nce,
    info_nce_logits,
    mean_entropy,
    ncd_criterion,
    self_distillation,
    supcon,
    supervised_ce,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def softmax_row(z: list[float], t: float) -> list[float]:
    m = max(z)
    e = [math.exp((x - m) / t) for x in z]
    s = sum(e)
    return [x / s for x in e]


# ---------------------------------------------------------------- slow references (loops)


def ref_ce(logits, labels, t):
    total = 0.0
    for z, y in zip(logits.tolist(), labels.tolist()):
        total += -math.log(softmax_row(z, t)[y])
    return total / len(labels)


def ref_targets(z, num_base, tt, scores, thred):
    out = []
    for row, s in zip(z.tolist(), scores.tolist()):
        p = softmax_row(row, tt)
        p = [0.0] * num_base + p[num_base:]
        tot = sum(p)
        p = [x / tot for x in p]
        w = max(0.0, thred - s)
        out.append([w * (c == num_base) + (1 - w) * x for c, x in enumerate(p)])
    return out


def ref_distill(student, targets, ts):
    """SimGCD's DistillLoss double loop: sum over ordered view pairs v != v', / n_terms."""
    b = student.shape[0] // 2
    views_s = [student[:b].tolist(), student[b:].tolist()]
    views_t = [targets[:b].tolist(), targets[b:].tolist()]
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(2):
            if v == iq:
                continue
            loss = 0.0
            for q, z in zip(views_t[iq], views_s[v]):
                p = softmax_row(z, ts)
                loss += -sum(qc * math.log(pc) for qc, pc in zip(q, p))
            total += loss / b
            terms += 1
    return total / terms


def ref_mean_entropy(logits, t):
    rows = [softmax_row(z, t) for z in logits.tolist()]
    c = len(rows[0])
    pbar = [sum(r[k] for r in rows) / len(rows) for k in range(c)]
    h = -sum(p * math.log(p) for p in pbar if p > 0)
    return math.log(c) - h


def ref_info_nce(proj, t):
    z = [unit(r) for r in proj.tolist()]
    n = len(z)
    b = n // 2
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        sims = {j: sum(a * c for a, c in zip(z[i], z[j])) / t for j in range(n) if j != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / n


def ref_supcon(proj_lab, labels, t, bt):
    n = proj_lab.shape[0]
    feats = [unit(r) for r in torch.cat([proj_lab[:, 0], proj_lab[:, 1]]).tolist()]
    labs = labels.tolist() * 2
    total = 0.0
    for a in range(2 * n):
        others = [k for k in range(2 * n) if k != a]
        denom = math.log(sum(math.exp(sum(x * y for x, y in zip(feats[a], feats[k])) / t) for k in others))
        pos = [k for k in others if labs[k] == labs[a]]
        mlpp = sum(sum(x * y for x, y in zip(feats[a], feats[p])) / t - denom for p in pos) / len(pos)
        total += -(t / bt) * mlpp
    return total / (2 * n)


# ---------------------------------------------------------------- single losses


def test_supervised_ce_matches_reference():
    z = torch.rand(6, 7, generator=gen(1)) * 2 - 1
    y = torch.tensor([0, 3, 1, 2, 0, 3])
    assert supervised_ce(z, y, 0.1).item() == pytest.approx(ref_ce(z, y, 0.1), rel=1e-5)


def test_corrected_targets_invariant_20():
    z = torch.rand(5, 7, generator=gen(2)) * 2 - 1
    scores = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.45])
    q = corrected_targets(z, num_base=4, teacher_temp=0.07, scores=scores, anomaly_thred=0.5)
    assert torch.allclose(q.sum(1), torch.ones(5), atol=1e-6)
    assert q[:, :4].abs().max() == 0
    assert torch.allclose(q, torch.tensor(ref_targets(z, 4, 0.07, scores, 0.5)), atol=1e-6)
    # w = max(0, 0.5 - s): score 0 puts half the mass on the normal slot L
    plain = corrected_targets(z, 4, 0.07, scores, anomaly_thred=-1.0)
    assert torch.allclose(q[0], 0.5 * torch.eye(7)[4] + 0.5 * plain[0], atol=1e-6)
    assert torch.allclose(q[2:4], plain[2:4])  # scores >= thred: w = 0
    assert torch.allclose(plain, torch.tensor(ref_targets(z, 4, 0.07, scores, -1.0)), atol=1e-6)
    assert not q.requires_grad
    # no base set: the normal slot is column 0
    q0 = corrected_targets(z, 0, 0.07, torch.zeros(5), 0.5)
    assert torch.allclose(q0.sum(1), torch.ones(5)) and (q0[:, 0] >= 0.5).all()


def test_self_distillation_matches_simgcd_double_loop():
    z = torch.rand(8, 7, generator=gen(3)) * 2 - 1
    t = corrected_targets(torch.rand(8, 7, generator=gen(4)), 4, 0.05, torch.rand(8, generator=gen(5)), 0.5)
    assert self_distillation(z, t, 0.1).item() == pytest.approx(ref_distill(z, t, 0.1), rel=1e-5)


def test_self_distillation_targets_are_constants():
    z = (torch.rand(4, 5, generator=gen(6)) * 2 - 1).requires_grad_(True)
    t = torch.softmax(z / 0.05, -1)  # attached to z on purpose
    self_distillation(z, t, 0.1).backward()
    expected = z.detach().clone().requires_grad_(True)
    self_distillation(expected, t.detach(), 0.1).backward()
    assert torch.allclose(z.grad, expected.grad)


def test_mean_entropy_invariant_21():
    z = torch.rand(6, 7, generator=gen(7)) * 2 - 1
    me = mean_entropy(z, 0.1).item()
    assert me >= 0 and me == pytest.approx(ref_mean_entropy(z, 0.1), abs=1e-6)
    uniform = torch.zeros(3, 5)
    assert mean_entropy(uniform, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    balanced = torch.eye(5) * 50  # confident rows whose mean is uniform
    assert mean_entropy(balanced, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[50.0, 0, 0, 0, 0]] * 4)
    assert mean_entropy(collapsed, 0.1).item() == pytest.approx(math.log(5), abs=1e-4)


def test_info_nce_invariant_22():
    b, d = 4, 6
    proj = torch.randn(2 * b, d, generator=gen(8))
    logits, targets = info_nce_logits(proj, temperature=0.5)
    assert logits.shape == (2 * b, 2 * b - 1) and (targets == 0).all()
    z = torch.nn.functional.normalize(proj, dim=-1)
    for i in range(2 * b):
        assert logits[i, 0].item() == pytest.approx((z[i] @ z[(i + b) % (2 * b)]).item() / 0.5, abs=1e-6)
        others = [j for j in range(2 * b) if j not in (i, (i + b) % (2 * b))]
        assert torch.allclose(logits[i, 1:], (z[others] @ z[i]) / 0.5, atol=1e-6)
    assert info_nce(proj, 1.0).item() == pytest.approx(ref_info_nce(proj, 1.0), rel=1e-5)
    assert info_nce(proj, 0.5).item() == pytest.approx(ref_info_nce(proj, 0.5), rel=1e-5)


def test_supcon_matches_reference():
    proj = torch.randn(5, 2, 6, generator=gen(9))
    labels = torch.tensor([0, 1, 0, 2, 1])
    got = supcon(proj, labels, 0.07, 0.07).item()
    assert got == pytest.approx(ref_supcon(proj, labels, 0.07, 0.07), rel=1e-5)
    assert supcon(proj, labels, 0.1, 0.07).item() == pytest.approx(ref_supcon(proj, labels, 0.1, 0.07), rel=1e-5)


def test_losses_are_float32_under_bf16_inputs():
    z = (torch.rand(8, 7, generator=gen(10)) * 2 - 1).bfloat16()
    assert torch.isfinite(mean_entropy(z, 0.1)) and mean_entropy(z, 0.1).dtype == torch.float32
    assert torch.isfinite(info_nce(torch.randn(8, 4).bfloat16(), 1.0))


# ---------------------------------------------------------------- criterion


def _batch(b=6, c=7, d=5, n_head=3, seed=11, n_lab=3):
    g = gen(seed)
    logits = [(torch.rand(2 * b, c, generator=g) * 2 - 1).requires_grad_(True) for _ in range(n_head)]
    proj = torch.randn(2 * b, d, generator=g).requires_grad_(True)
    labelled = torch.zeros(b, dtype=torch.bool)
    labelled[:n_lab] = True
    labels = torch.randint(0, 4, (b,), generator=g)
    scores = torch.rand(b, generator=g)
    return logits, proj, labels, labelled, scores


def test_criterion_combines_the_terms():
    cfg = LossConfig()
    logits, proj, labels, labelled, scores = _batch()
    out = ncd_criterion(logits, proj, labels, labelled, scores, num_base=4, teacher_temp=0.07, cfg=cfg)
    lab_rows, unl_rows = labelled.repeat(2), (~labelled).repeat(2)
    lam = cfg.sup_weight
    cls = sum(ref_ce(z[lab_rows].detach(), labels.repeat(2)[lab_rows], 0.1) for z in logits) / 3
    clusters = []
    for z in logits:
        zu = z[unl_rows].detach()
        t = torch.tensor(ref_targets(zu, 4, 0.07, scores.repeat(2)[unl_rows], 0.5))
        clusters.append(ref_distill(zu, t, 0.1) + 4 * ref_mean_entropy(zu, 0.1))
    nce = ref_info_nce(proj.detach(), 1.0)
    sc = ref_supcon(torch.stack([proj[:6][labelled], proj[6:][labelled]], 1).detach(), labels[labelled], 0.07, 0.07)
    expected = (1 - lam) * sum(clusters) / 3 + lam * cls + (1 - lam) * nce + lam * sc
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert out["supcon"].item() == pytest.approx(sc, rel=1e-5)
    assert out["infonce"].item() == pytest.approx(nce, rel=1e-5)
    assert torch.allclose(out["cluster_per_head"], torch.tensor(clusters), rtol=1e-5)
    out["loss"].backward()
    assert all(z.grad is not None for z in logits) and proj.grad is not None


def test_criterion_without_labelled_rows_drops_supervised_terms():
    cfg = LossConfig()
    logits, proj, labels, labelled, scores = _batch(n_lab=0)
    out = ncd_criterion(logits, proj, labels, labelled, scores, num_base=4, teacher_temp=0.07, cfg=cfg)
    assert math.isnan(out["cls"]) and math.isnan(out["supcon"])
    expected = (1 - cfg.sup_weight) * (out["cluster"] + out["infonce"])
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    # only unlabelled rows: clustering terms NaN when there are none
    logits, proj, labels, labelled, scores = _batch(n_lab=6)
    out = ncd_criterion(logits, proj, labels, labelled, scores, num_base=4, teacher_temp=0.07, cfg=cfg)
    assert torch.isfinite(out["loss"]) and torch.isnan(out["cluster_per_head"]).all()


def test_criterion_rejects_misaligned_rows():
    logits, proj, labels, labelled, scores = _batch()
    with pytest.raises(ValueError, match="view-major"):
        ncd_criterion(logits, proj[:-2], labels, labelled, scores, num_base=4, teacher_temp=0.07, cfg=LossConfig())


# ---------------------------------------------------------------- 2 ranks == 1 process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs():
    """Whole batch B=6 (first 3 samples on rank 0, last 3 on rank 1); rank 0 has no labelled sample."""
    g = gen(21)
    x = torch.randn(2, 6, 4, generator=g)  # (view, sample, in)
    labelled = torch.tensor([False, False, False, True, True, False])
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    logits_in = torch.randn(2, 6, 5, generator=g)
    scores = torch.rand(6, generator=g)
    return x, labelled, labels, logits_in, scores


def _losses(lin: torch.nn.Linear, x, labelled, labels, logits_in, scores, gather: bool):
    proj = lin(torch.cat([x[0], x[1]]))  # view-major (2b, d)
    logits = [torch.cat([logits_in[0], logits_in[1]]) + proj[:, :1]]  # depends on the weights too
    b = x.shape[1]
    proj_lab = torch.stack([proj[:b][labelled], proj[b:][labelled]], dim=1)
    parts = {
        "infonce": info_nce(proj, 0.5, gather=gather),
        "supcon": supcon(proj_lab, labels[labelled], 0.07, 0.07, gather=gather),
        "memax": mean_entropy(logits[0], 0.1, gather=gather),
    }
    crit = ncd_criterion(logits, proj, labels, labelled, scores, num_base=2, teacher_temp=0.07,
                         cfg=LossConfig(), gather=gather)
    return parts, crit["loss"]


def _single_process_grads():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x, labelled, labels, logits_in, scores = _global_inputs()
    parts, total = _losses(lin, x, labelled, labels, logits_in, scores, gather=False)
    out = {}
    for name, loss in [*parts.items(), ("criterion", total)]:
        lin.zero_grad()
        loss.backward(retain_graph=True)
        out[name] = (loss.item(), lin.weight.grad.clone(), lin.bias.grad.clone())
    return out


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        x, labelled, labels, logits_in, scores = _global_inputs()
        sl = slice(3 * rank, 3 * rank + 3)
        parts, total = _losses(lin, x[:, sl], labelled[sl], labels[sl], logits_in[:, sl], scores[sl], gather=True)
        out = {}
        for name, loss in [*parts.items(), ("criterion", total)]:
            lin.zero_grad()
            loss.backward(retain_graph=True)
            grads = [lin.weight.grad.clone(), lin.bias.grad.clone()]
            for gr in grads:  # what DDP does to parameter gradients
                torch.distributed.all_reduce(gr)
                gr /= world
            value = ncd_dist.all_reduce_mean(loss.detach())
            out[name] = (value.item(), grads[0].tolist(), grads[1].tolist())  # plain data: no fd sharing
        queue.put((rank, out))
    except Exception as err:  # noqa: BLE001 - report to the parent instead of hanging it
        queue.put((rank, repr(err)))
        raise
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_gradients_match_one_process():
    expected = _single_process_grads()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank in range(2):
        assert isinstance(results[rank], dict), results[rank]
        for name, (value, gw, gb) in results[rank].items():
            gw, gb = torch.tensor(gw), torch.tensor(gb)
            ev, ew, eb = expected[name]
            assert value == pytest.approx(ev, rel=1e-5), (rank, name)
            assert torch.allclose(gw, ew, atol=1e-6, rtol=1e-5), (rank, name)
            assert torch.allclose(gb, eb, atol=1e-6, rtol=1e-5), (rank, name)
