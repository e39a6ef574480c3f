"""Online distillation as a training mode: BD-KD, and the DML and fixed-teacher KD baselines on the same trainer.

Amara et al., *BD-KD: Balancing the Divergences for Online Knowledge Distillation* (spec algorithms_B §6). Teacher
and student train together; the student's loss weights, per sample, the forward KL ``KL(p_t||p_s)`` and the reverse
KL ``KL(p_s||p_t)`` by the sign of the entropy gap, and the teacher's loss carries a reverse-KL regulariser:

    p = softmax(z / tau);  H(p) = -sum p log p  (per sample, on the softened distributions: our reading, §6.2 [MEM])
    L_S = CE(y, z_s) + tau^2 mean_i [a_i KL(p_t||p_s) + b_i KL(p_s||p_t)]   (teacher detached)
          (a_i, b_i) = (1, delta) where H(p_s) > H(p_t) (under-confident student: more mode-seeking reverse KL)
                       (delta, 1) otherwise                 (over-confident student: more mass-covering forward KL)
    L_T = CE(y, z_t) + gamma tau^2 mean_i KL(p_s||p_t)                     (student detached)

DML (Zhang et al., CVPR 2018): each network's loss is its CE plus ``tau^2 KL(p_other||p_self)`` with the other
detached. KD (Hinton et al. 2015) with a fixed teacher: the student's CE plus ``tau^2 KL(p_t||p_s)``; the teacher is
frozen and runs without a graph. Defaults ``tau = 4``, ``delta = 2``, ``gamma = 1`` are our choices (the spec marks
the paper's values as not retrieved).

:class:`OnlineDistillation` is a module holding both networks: in training mode it returns ``(z_s, z_t)`` and its
:meth:`~OnlineDistillation.training_loss` is ``L_S + L_T`` (each network's gradient comes from its own loss only, as
each loss detaches the other network's distribution), so :func:`edgetrain.train`, :func:`edgetrain.measure` (both
networks metered in one step) and the bench run it like any model, and techniques act on either network by targets
(``student.*``); in eval mode it is the student. ``edgetrain.distill:pair`` is a ``package.module:factory`` model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError

METHODS = ("bdkd", "dml", "kd")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample ``KL(p||q)`` from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def losses(z_s: Tensor, z_t: Tensor, y: Tensor, method: str = "bdkd", tau: float = 4.0, delta: float = 2.0,
           gamma: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """``(L_S, L_T)`` of one batch (``L_T`` is ``None`` for ``kd``: the teacher does not train)."""
    ls, lt = F.log_softmax(z_s / tau, 1), F.log_softmax(z_t / tau, 1)
    ls_d, lt_d = ls.detach(), lt.detach()
    ce_s = F.cross_entropy(z_s, y)
    if method == "bdkd":
        with torch.no_grad():
            gap = -(ls.exp() * ls).sum(1) > -(lt.exp() * lt).sum(1)  # H(p_s) > H(p_t)
            a = torch.where(gap, 1.0, delta).to(z_s.dtype)
            b = torch.where(gap, delta, 1.0).to(z_s.dtype)
        student = ce_s + tau ** 2 * (a * _kl(lt_d, ls) + b * _kl(ls, lt_d)).mean()
        teacher = F.cross_entropy(z_t, y) + gamma * tau ** 2 * _kl(ls_d, lt).mean()
        return student, teacher
    student = ce_s + tau ** 2 * _kl(lt_d, ls).mean()
    if method == "dml":
        return student, F.cross_entropy(z_t, y) + tau ** 2 * _kl(ls_d, lt).mean()
    if method == "kd":
        return student, None
    raise ConfigError(f"distillation method {method!r}: choose one of {', '.join(METHODS)}")


class OnlineDistillation(nn.Module):
    """A teacher and a student trained together (``bdkd``, ``dml``) or a student taught by a fixed teacher
    (``kd``). Training mode: ``forward`` returns ``(student logits, teacher logits)``; eval mode: the student's."""

    def __init__(self, teacher: nn.Module, student: nn.Module, method: str = "bdkd", tau: float = 4.0,
                 delta: float = 2.0, gamma: float = 1.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"distillation method {method!r}: choose one of {', '.join(METHODS)}")
        for name, v in (("tau", tau), ("delta", delta), ("gamma", gamma)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 or (name == "gamma" and v == 0)):
                raise ConfigError(f"distillation {name}: must be {'>= 0' if name == 'gamma' else '> 0'}, got {v!r}")
        self.teacher, self.student = teacher, student
        self.method, self.tau, self.delta, self.gamma = method, float(tau), float(delta), float(gamma)
        if method == "kd":
            self.teacher.requires_grad_(False)
        self.block_names = [f"student.{b}" for b in getattr(student, "block_names", [])] or None
        if getattr(student, "classifier_name", None):
            self.classifier_name = f"student.{student.classifier_name}"
        if self.block_names is None:
            del self.block_names

    def train(self, mode: bool = True) -> OnlineDistillation:
        super().train(mode)
        if self.method == "kd":
            self.teacher.eval()  # a fixed teacher: its BatchNorm statistics stay
        return self

    def forward(self, x: Tensor) -> Any:
        if not self.training:
            return self.student(x)
        if self.method == "kd":
            with torch.no_grad():
                z_t = self.teacher(x)
        else:
            z_t = self.teacher(x)
        return self.student(x), z_t  # (N, classes) each

    def training_loss(self, out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        """``L_S + L_T`` (``L_S`` for ``kd``); each network's gradient is its own loss's."""
        student, teacher = losses(out[0], out[1], y, self.method, self.tau, self.delta, self.gamma)
        return student if teacher is None else student + teacher


def pair(num_classes: int = 10, in_channels: int = 3, teacher: str = "mobilenet_v2", student: str = "small_cnn",
         method: str = "bdkd", tau: float = 4.0, delta: float = 2.0, gamma: float = 1.0,
         teacher_pretrained: bool = True, teacher_weights: str | None = None,
         student_args: dict | None = None, teacher_args: dict | None = None) -> OnlineDistillation:
    """The ``package.module:factory`` model ``edgetrain.distill:pair``: a teacher (ImageNet weights when
    ``teacher_pretrained``, or a state dict file ``teacher_weights``, e.g. a teacher trained first for ``kd``) and a
    freshly initialised student, both built by :func:`edgetrain.models.create_model`."""
    from edgetrain.models import create_model, load_pretrained, load_weights

    if teacher_weights is not None:
        t = create_model(teacher, num_classes=num_classes, in_channels=in_channels, **(teacher_args or {}))
        load_weights(t, teacher_weights)
    elif teacher_pretrained:
        t = load_pretrained(teacher, num_classes=num_classes, **(teacher_args or {}))
    else:
        t = create_model(teacher, num_classes=num_classes, in_channels=in_channels, **(teacher_args or {}))
    s = create_model(student, num_classes=num_classes, in_channels=in_channels, **(student_args or {}))
    return OnlineDistillation(t, s, method, tau, delta, gamma)
