"""Chunk-alignment distillation losses (Dewey report, arXiv 2503.20376; weights from the
Jasper/Stella recipe, arXiv 2412.19048).

With s the L2-normalised student vectors and t the teacher vectors of one batch:
- cosine loss: sum over the vectors of (1 - s . t);
- similarity loss: MSE(S S^T, T T^T), the mean squared difference of the two batch similarity matrices.
Both are taken once over the batch's CLS vectors (against whole-text targets) and once over all its
chunk vectors (against each chunk embedded alone). The total is
``cosine_weight * (cos_cls + cos_chunks) + similarity_weight * (sim_cls + sim_chunks)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - cos(student_i, teacher_i)); [N, D] each."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} vectors differ in shape")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return (1.0 - (s * t).sum(dim=-1)).sum()


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the cosine-similarity matrices of the student and teacher vectors; [N, D] each."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student.shape[0]} student vectors but {teacher.shape[0]} teacher vectors")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


def distillation_loss(cls: torch.Tensor, cls_target: torch.Tensor, chunks: torch.Tensor, chunk_target: torch.Tensor,
                      cosine_weight: float = 10.0, similarity_weight: float = 200.0):
    """The weighted total and each term (as floats, for logging)."""
    terms = {
        "cos_cls": cosine_loss(cls, cls_target),
        "sim_cls": similarity_loss(cls, cls_target),
        "cos_chunks": cosine_loss(chunks, chunk_target),
        "sim_chunks": similarity_loss(chunks, chunk_target),
    }
    total = (cosine_weight * (terms["cos_cls"] + terms["cos_chunks"])
             + similarity_weight * (terms["sim_cls"] + terms["sim_chunks"]))
    return total, {k: float(v.detach()) for k, v in terms.items()}
