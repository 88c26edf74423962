"""EMA teacher and momentum schedule (aclip/methods/ema.py)."""

import math

import pytest
import torch
from torch import nn

from aclip.methods.ema import EMATeacher, ema_momentum


def _student():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )


def test_ema_momentum_cosine_formula():
    total = 1000
    for step in (0, 1, 137, 250, 500, 777, 999, 1000):
        expected = 1.0 - (1.0 - 0.996) * (math.cos(math.pi * step / total) + 1) / 2
        assert ema_momentum(step, total) == pytest.approx(expected, abs=1e-12)
    assert ema_momentum(0, total) == pytest.approx(0.996, abs=1e-12)
    assert ema_momentum(500, total) == pytest.approx(0.998, abs=1e-12)
    assert ema_momentum(total, total) == pytest.approx(1.0, abs=1e-12)
    assert ema_momentum(5 * total, total) == pytest.approx(1.0, abs=1e-12)  # clamped
    assert ema_momentum(10, 100, base=0.99, final=0.999) == pytest.approx(
        0.999 - 0.009 * (math.cos(math.pi * 0.1) + 1) / 2, abs=1e-12
    )
    values = [ema_momentum(s, total) for s in range(total + 1)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[1] > values[0]


def test_update_equals_manual_ema_and_copies_buffers():
    student = _student()
    teacher = EMATeacher(student)
    before = {k: v.clone() for k, v in teacher.module.named_parameters()}
    # Change the student: new weights and new BN running statistics.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(16, 6))  # updates BN running stats
    m = 0.9
    teacher.update(student, m)
    s_params = dict(student.named_parameters())
    for name, t in teacher.module.named_parameters():
        expected = m * before[name] + (1 - m) * s_params[name].detach()
        torch.testing.assert_close(t, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(t, s_params[name])
    bn_t, bn_s = teacher.module[1], student[1]
    torch.testing.assert_close(bn_t.running_mean, bn_s.running_mean, atol=0, rtol=0)
    torch.testing.assert_close(bn_t.running_var, bn_s.running_var, atol=0, rtol=0)
    assert bn_t.num_batches_tracked.item() == bn_s.num_batches_tracked.item() == 1
    assert bn_s.running_mean.abs().sum() > 0


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    student = _student()
    teacher = EMATeacher(student)
    frozen = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0).add_(1.0)
    teacher.update(student, 1.0)
    for t, f in zip(teacher.module.parameters(), frozen, strict=True):
        torch.testing.assert_close(t, f, atol=0, rtol=0)
    teacher.update(student, 0.0)
    for t, s in zip(teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s.detach(), atol=0, rtol=0)


def test_teacher_frozen_eval_and_separate():
    student = _student()
    student.train()
    teacher = EMATeacher(student)
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    student.train()
    teacher.train()
    assert not teacher.module.training and student.training
    bn = [m for m in teacher.module.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bn) == 1 and bn[0].training and not bn[0].track_running_stats
    assert all(not m.training for m in teacher.module.modules() if m not in bn)
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in teacher.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    # Teacher output is deterministic (dropout off) and has no graph.
    x = torch.randn(4, 6)
    y1, y2 = teacher(x), teacher(x)
    assert torch.equal(y1, y2) and not y1.requires_grad


def test_the_teachers_batchnorm_normalises_with_the_batch_statistics():
    """BYOL's target network (and the official A-CLIP code, whose EMA modules run in train mode)
    normalises each batch with its own statistics; the running ones stay as copied."""
    student = _student()
    with torch.no_grad():
        student[1].running_mean.fill_(5.0)  # far from the batch's: a running-stat pass differs
        student[1].running_var.fill_(9.0)
    teacher = EMATeacher(student)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    linear, norm, last = teacher.module[0], teacher.module[1], teacher.module[4]
    h = linear(x)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    reference = last(torch.relu((h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias))
    torch.testing.assert_close(teacher(x), reference, atol=1e-6, rtol=1e-6)
    assert torch.all(norm.running_mean == 5.0) and torch.all(norm.running_var == 9.0)
    assert not torch.allclose(teacher(x), student.eval()(x), atol=1e-2)


def test_teacher_not_in_parent_module_parameters():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = _student()
            self.teacher = EMATeacher(self.student)

    holder = Holder()
    assert len(list(holder.parameters())) == len(list(holder.student.parameters()))


def test_state_dict_round_trip():
    student = _student()
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, 0.5)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    other = EMATeacher(_student())
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0)
    assert not other.module.training
    assert all(not p.requires_grad for p in other.module.parameters())
    assert other.to("cpu") is other
