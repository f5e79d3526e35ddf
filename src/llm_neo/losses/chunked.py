"""The chunked (fused lm_head + loss) path: the LLM-Neo objective without ever holding [N, V] logits.

Why: at a Llama-3 vocabulary (V = 128,256) the ``[tokens, V]`` logits of the student and the teacher,
in fp32 plus their softmax/gradient temporaries, are most of a distillation step's memory, more than
the LoRA student itself. Here both models stop at their final hidden states; each chunk of
``chunk_size`` tokens is projected by the lm_heads, its CE and divergence computed with the same
per-token functions as ``distill_loss``, its gradients taken while its logits exist, and its logits
freed before the next chunk, so the peak logits memory is ``chunk_size x V`` per model instead of
``N x V``, whatever N is.

For CE + forward KL (LLM-Neo's default) and CE alone, the gradient with respect to each chunk's
logits is written out in closed form, in place (``_analytic_chunk``): three fp32 [C, V] tensors per
chunk instead of the eight autograd keeps, and the same three for every chunk of a loop
(``_Scratch``), so that a loop allocates them once rather than once per chunk. The other divergences,
soft-capped students and cached teachers go through autograd per chunk.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from llm_neo.losses.divergences import TopKTargets, check_topk
from llm_neo.losses.objective import (
    LossOptions,
    LossParts,
    check_kd_rows,
    check_num_tokens,
    check_teacher_given,
    check_vocab_widths,
    kd_per_token,
    objective,
    select_rows,
    softcap,
)


class HeadInput(NamedTuple):
    """An lm_head and what it is applied to.

    hidden   [N, H] final hidden states (after the final norm) at the trained positions; a teacher's
             may be an inference-mode tensor
    weight   [V, H] the lm_head weight (trainable or frozen; a teacher's never receives a gradient)
    bias     [V] the lm_head bias, or None
    softcap  Gemma-style final-logit soft-capping ``cap * tanh(x / cap)``, or None (off)
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None


@dataclass(frozen=True, eq=False)
class _DenseTeacher:
    """The teacher's side of the chunk loop: its hidden states and its head, sliced to the KD vocabulary
    and cast to the matmul dtype once (not per chunk)."""

    hidden: Tensor  # [N, H_t]
    head: Tensor  # [V_kd, H_t]
    bias: Tensor | None  # [V_kd]
    dtype: torch.dtype  # matmul dtype of the teacher head
    softcap: float | None


@dataclass(frozen=True, eq=False)
class _ChunkPlan:
    """Everything the chunk loop needs besides the three differentiable student inputs.

    The teacher tensors and the targets travel inside this object rather than as arguments of
    ``_ChunkedDistill.apply`` so that autograd never records them as inputs: the teacher hidden states
    may be inference-mode tensors, which autograd refuses to track.
    """

    targets: Tensor  # [N] int64
    options: LossOptions
    num_tokens: int | Tensor
    student_dtype: torch.dtype  # matmul dtype of the student head
    student_softcap: float | None
    teacher: _DenseTeacher | TopKTargets | None  # None when the KD term is skipped
    kd_rows: Tensor | None = None  # [N] bool: the rows the KD term is taken on; None: every row


def chunked_distill_loss(
    student: HeadInput,
    targets: Tensor,
    teacher: HeadInput | TopKTargets | None = None,
    *,
    options: LossOptions,
    num_tokens: int | Tensor,
    kd_rows: Tensor | None = None,
) -> LossParts:
    """``distill_loss`` fused with the lm_heads, computed in token chunks: no [N, V] logits ever exist.

    Shapes: ``student`` and ``teacher`` as ``HeadInput`` (hidden [N, H], weight [V, H], bias [V],
    softcap), ``targets [N]`` int64 next-token ids (every position is trained); or the teacher as a
    cache's ``TopKTargets`` [N, k] / [N], whose matmul is then a slice of the cached targets.

    Contract: returns the same ``LossParts`` as
    ``distill_loss(softcap(student.hidden @ student.weight.T + student.bias), targets,
    softcap(teacher.hidden @ teacher.weight.T + teacher.bias), options=..., num_tokens=...)``, and the
    same gradients w.r.t. the student's hidden states, weight and bias (each only if it requires
    grad). Sums over chunks equal sums over the batch up to float rounding; the teacher's head is
    sliced to ``kd_vocab_size`` before its matmul, which skips the padding columns' work.

    Dtypes: the matmul runs in the hidden states' dtype (the head is cast once if it differs), or in the
    autocast dtype when called inside an autocast region (as a plain ``lm_head`` would); the losses in
    float32 (float64 when the matmul is float64, CE included, where ``distill_loss`` computes CE in
    float32). Gradients come back in each input's own dtype; the head/bias gradients are accumulated in
    float32 across chunks. ``ce_sum``/``kd_sum`` are detached (loss dtype).

    Gradients are computed during the forward (while each chunk's logits exist), which is why no
    logits are kept for the backward; the backward only scales them by the incoming gradient. So call
    it under ``torch.no_grad()`` when no backward will follow (evaluation): then nothing extra is
    computed. The backward is not differentiable again (no double backward). With ``kd_ratio == 0`` or
    no teacher the teacher is never run (``kd_sum = 0``). ``kd_rows`` as in ``distill_loss`` (these
    calls go through autograd per chunk, never the analytic path).
    """
    check_num_tokens(num_tokens)
    check_head("student", student)
    if student.hidden.dim() != 2 or targets.shape != student.hidden.shape[:1]:
        raise ValueError(
            f"expected student_hidden [N, H] and targets [N], got {tuple(student.hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    check_teacher_given(teacher, options.kd_ratio)
    if kd_rows is not None:
        check_kd_rows(kd_rows, student.hidden.shape[0])
    kd_teacher: _DenseTeacher | TopKTargets | None = None
    if isinstance(teacher, TopKTargets):
        width = options.kd_vocab_size or student.weight.shape[0]
        if width > student.weight.shape[0]:
            raise ValueError(f"kd_vocab_size={width} must be in [1, {student.weight.shape[0]}]")
        check_topk(student.hidden.new_empty((student.hidden.shape[0], width)), teacher)
        kd_teacher = teacher if options.kd_ratio > 0 else None
    elif teacher is not None:
        check_teacher_head(student, teacher, options.kd_vocab_size)
        kd_teacher = _dense_teacher(teacher, options.kd_vocab_size) if options.kd_ratio > 0 else None
    plan = _ChunkPlan(
        targets=targets,
        options=options,
        num_tokens=num_tokens,
        student_dtype=_matmul_dtype(student.hidden),
        student_softcap=student.softcap,
        teacher=kd_teacher,
        kd_rows=kd_rows,
    )
    return _run_chunks(plan, student.hidden, student.weight, student.bias)


def check_head(who: str, head: HeadInput) -> None:
    """Raise ValueError/TypeError unless ``head`` is [N, H] hidden states with a floating [V, H] weight, a
    [V] bias or None, and a finite soft-cap > 0 or None; ``who`` ("student", "teacher") names it."""
    hidden, weight, bias, cap = head
    if hidden is None or weight is None:
        raise ValueError(
            f"{who}: pass both its hidden states and its lm_head weight ({who}_hidden and {who}_head)"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{who}_hidden {tuple(hidden.shape)} and {who}_head {tuple(weight.shape)} must be [N, H] and "
            "[V, H] with the same hidden size H (the head is the lm_head weight, [out, in])"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{who}_bias {tuple(bias.shape)} must be [V] = {tuple(weight.shape[:1])}")
    for name, t in ((f"{who}_hidden", hidden), (f"{who}_head", weight), (f"{who}_bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if cap is not None and not (isinstance(cap, (int, float)) and 0 < cap < float("inf")):
        raise ValueError(f"{who}_softcap must be None (off) or a finite number > 0, got {cap}")


def check_teacher_head(student: HeadInput, teacher: HeadInput, kd_vocab_size: int | None) -> None:
    """``check_head`` for the teacher, plus: the student's N positions, and vocabulary widths the KD
    columns (``kd_vocab_size``) fit in."""
    check_head("teacher", teacher)
    if teacher.hidden.shape[0] != student.hidden.shape[0]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher.hidden.shape)} must be [N, H_t] with the student's N = "
            f"{student.hidden.shape[0]}"
        )
    check_vocab_widths(student.weight.shape[0], teacher.weight.shape[0], kd_vocab_size)


def _dense_teacher(teacher: HeadInput, kd_vocab_size: int | None) -> _DenseTeacher:
    dtype = _matmul_dtype(teacher.hidden)
    rows = slice(None) if kd_vocab_size is None else slice(0, kd_vocab_size)
    with torch.no_grad():
        head = teacher.weight.detach()[rows].to(dtype)  # [V_kd, H_t], cast once
        bias = None if teacher.bias is None else teacher.bias.detach()[rows]
    return _DenseTeacher(teacher.hidden, head, bias, dtype, teacher.softcap)


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype a plain ``lm_head(hidden)`` would compute in: the autocast dtype inside an autocast
    region (autocast leaves float64 alone), else the hidden states' own dtype."""
    device = hidden.device.type
    if (
        hidden.dtype != torch.float64
        and torch.amp.is_autocast_available(device)
        and torch.is_autocast_enabled(device)
    ):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _autocast_off(device: torch.device) -> AbstractContextManager[object]:
    # Inside the loop every cast is explicit, so an ambient autocast region must not re-cast anything.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _run_chunks(plan: _ChunkPlan, hidden: Tensor, head: Tensor, bias: Tensor | None) -> LossParts:
    """Run the chunk loop, through the autograd Function only when some student input needs a gradient."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and head.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    n_local = hidden.shape[0]
    if not any(needs):
        # Nothing to differentiate (evaluation, or all inputs frozen): values only, no gradient work.
        loss, ce_sum, kd_sum, *_ = _chunk_loop(plan, hidden, head, bias, needs)
        return LossParts(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum, num_tokens=n_local)
    loss, ce_sum, kd_sum = _ChunkedDistill.apply(hidden, head, bias, plan, needs)
    return LossParts(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum, num_tokens=n_local)


@dataclass
class _Grads:
    """The gradient accumulators of one chunk loop (None for inputs that need none)."""

    hidden: Tensor | None  # [N, H_s], written chunk by chunk
    head: Tensor | None  # [V_s, H_s], summed over chunks in fp32 (fp64 stays fp64)
    bias: Tensor | None  # [V_s], likewise

    def add(
        self, start: int, stop: int, hidden: Tensor | None, head: Tensor | None, bias: Tensor | None
    ) -> None:
        if self.hidden is not None and hidden is not None:
            self.hidden[start:stop] = hidden
        if self.head is not None and head is not None:
            self.head += head
        if self.bias is not None and bias is not None:
            self.bias += bias


@dataclass
class _Loop:
    """What every chunk step of one loop reads, and the gradients it adds to."""

    plan: _ChunkPlan
    hidden: Tensor  # [N, H_s] the student's hidden states
    head: Tensor  # [V_s, H_s] the student's head, in the matmul dtype
    bias: Tensor | None  # [V_s]
    loss_dtype: torch.dtype
    grads: _Grads
    scratch: _Scratch | None = None  # the analytic path's [C, V] buffers


@dataclass
class _Scratch:
    """The analytic chunk's [C, V] buffers, allocated once per loop and reused by every chunk.

    Why: on a CPU each fresh ``[C, V]`` tensor at or above glibc's mmap threshold (llm-neo's CPU policy,
    ``runtime.memory``) is mapped, page-faulted in and unmapped again. For every chunk, in fp32, that was
    about a third of the loss's CPU time. Reused buffers pay that once per loop.

    logits   [C, V_s] the student's logits, then its softmax, then the gradient w.r.t. its logits
    teacher  [C, V_kd] the teacher's logits, then log p, then log p - log q, then (for T != 1 or fewer
             KD columns) q = softmax(s / T)
    work     [C, V_s] exp(x - max) of each logsumexp; then the teacher's p on the first V_kd columns

    CE alone needs only ``logits`` (its logsumexp runs in place there).
    """

    logits: Tensor
    teacher: Tensor | None  # None for CE alone
    work: Tensor | None  # likewise

    @staticmethod
    def for_loop(
        rows: int, student_width: int, plan: _ChunkPlan, dtype: torch.dtype, device: torch.device
    ) -> _Scratch:
        kd_width = plan.options.kd_vocab_size or student_width
        dense = isinstance(plan.teacher, _DenseTeacher)
        return _Scratch(
            logits=torch.empty((rows, student_width), dtype=dtype, device=device),
            teacher=torch.empty((rows, kd_width), dtype=dtype, device=device) if dense else None,
            work=torch.empty((rows, student_width), dtype=dtype, device=device) if dense else None,
        )


def _chunk_loop(
    plan: _ChunkPlan,
    student_hidden: Tensor,
    student_head: Tensor,
    student_bias: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, ce_sum, kd_sum, grad_hidden, grad_head, grad_bias): values, and the gradients of ``loss``
    w.r.t. the inputs flagged in ``needs`` (None for the others), one chunk of tokens at a time."""
    need_hidden, need_head, need_bias = needs
    device = student_hidden.device
    loss_dtype = torch.float64 if plan.student_dtype == torch.float64 else torch.float32
    # Cast the head once (not per chunk: that would copy [V, H] every chunk); an alias if no cast is due.
    head = student_head.detach().to(plan.student_dtype).requires_grad_(need_head)  # [V_s, H_s]
    bias = None if student_bias is None else student_bias.detach().requires_grad_(need_bias)  # [V_s]
    acc_dtype = torch.float64 if student_head.dtype == torch.float64 else torch.float32
    grads = _Grads(
        hidden=torch.zeros_like(student_hidden) if need_hidden else None,
        head=torch.zeros(student_head.shape, dtype=acc_dtype, device=device) if need_head else None,
        bias=torch.zeros(student_bias.shape, dtype=acc_dtype, device=device)
        if need_bias and student_bias is not None
        else None,
    )
    ce_total = torch.zeros((), dtype=loss_dtype, device=device)
    kd_total = torch.zeros((), dtype=loss_dtype, device=device)
    # CE + forward KL (LLM-Neo's default) and plain CE take the analytic-gradient path; the other
    # divergences, soft-capped students and cached teachers go through autograd per chunk.
    analytic = (
        not isinstance(plan.teacher, TopKTargets)
        and plan.kd_rows is None
        and plan.student_softcap is None
        and (plan.teacher is None or plan.options.divergence == "forward_kl")
    )
    chunk = _analytic_chunk if analytic else _autograd_chunk
    rows = min(plan.options.chunk_size, student_hidden.shape[0])
    scratch = _Scratch.for_loop(rows, head.shape[0], plan, loss_dtype, device) if analytic else None
    loop = _Loop(plan, student_hidden, head, bias, loss_dtype, grads, scratch)
    with _autocast_off(device):
        for start in range(0, student_hidden.shape[0], plan.options.chunk_size):
            ce, kd = chunk(loop, start, min(start + plan.options.chunk_size, student_hidden.shape[0]))
            ce_total += ce
            kd_total += kd

    loss = objective(ce_total, kd_total, plan.options.kd_ratio, _detached(plan.num_tokens))
    grad_head_out = None if grads.head is None else grads.head.to(student_head.dtype)
    grad_bias_out = None
    if grads.bias is not None and student_bias is not None:
        grad_bias_out = grads.bias.to(student_bias.dtype)
    return loss, ce_total, kd_total, grads.hidden, grad_head_out, grad_bias_out


def _detached(num_tokens: int | Tensor) -> int | Tensor:
    return num_tokens.detach() if isinstance(num_tokens, Tensor) else num_tokens


def _autograd_chunk(loop: _Loop, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(ce_sum, kd_sum) of chunk [start, stop), detached, with its gradients added to ``loop.grads`` by
    autograd through this chunk's logits only."""
    plan, head, bias, loss_dtype, grads = loop.plan, loop.head, loop.bias, loop.loss_dtype, loop.grads
    need_hidden = grads.hidden is not None
    leaves = [t for t, acc in ((head, grads.head), (bias, grads.bias)) if acc is not None and t is not None]
    h = loop.hidden[start:stop].detach().requires_grad_(need_hidden)  # [C, H_s]
    o = plan.options
    with torch.set_grad_enabled(need_hidden or bool(leaves)):
        logits = F.linear(h.to(plan.student_dtype), head).to(loss_dtype)  # [C, V_s]
        if bias is not None:
            logits = logits + bias.to(loss_dtype)
        logits = softcap(logits, plan.student_softcap)
        # CE exactly as distill_loss: full student width, no temperature, fp32 (fp64 for fp64).
        # With kd_ratio == 1 it is only logged, so keep it out of the graph.
        ce_logits = logits.detach() if o.kd_ratio == 1.0 else logits
        ce = F.cross_entropy(ce_logits, plan.targets[start:stop], reduction="sum")
        kd = ce.new_zeros(())
        if plan.teacher is not None:
            student_kd = logits if o.kd_vocab_size is None else logits[:, : o.kd_vocab_size]  # a view
            if isinstance(plan.teacher, TopKTargets):
                teacher: Tensor | TopKTargets = plan.teacher.slice(start, stop)
            else:
                teacher = _teacher_chunk_logits(plan.teacher, start, stop, loss_dtype)  # [C, V_kd]
            if plan.kd_rows is not None:  # KD on the chunk's selected rows only (CE stays on all)
                rows = plan.kd_rows[start:stop]
                student_kd, teacher = student_kd[rows], select_rows(teacher, rows)
            kd = kd_per_token(student_kd, teacher, o).sum()
            del student_kd, teacher
        loss = objective(ce, kd, o.kd_ratio, _detached(plan.num_tokens))
    del logits, ce_logits  # the chunk's [C, V] tensors die here (the graph holds them until grad)
    if loss.requires_grad:
        inputs = ([h] if need_hidden else []) + leaves
        found = list(torch.autograd.grad(loss, inputs))
        g_hidden = found.pop(0) if need_hidden else None
        g_head = found.pop(0) if grads.head is not None else None
        g_bias = found.pop(0) if grads.bias is not None else None
        grads.add(start, stop, g_hidden, g_head, g_bias)
    return ce.detach(), kd.detach()


@torch.no_grad()
def _analytic_chunk(loop: _Loop, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(ce_sum, kd_sum) of one chunk for CE + forward KL (or CE alone), with the gradient w.r.t. the
    chunk's student logits written out instead of taken by autograd.

    Why: autograd through log_softmax / exp / where keeps about eight fp32 [C, V] tensors alive at
    once (33 bytes per logit measured); this keeps three (the student logits, which become the gradient
    in place, the teacher log-ratio and the teacher probabilities, the latter in the logsumexp's
    workspace), so the chunk's memory is about 12 bytes per logit and a step's peak is set by the models
    rather than by the loss. The three are ``loop.scratch``'s, the same for every chunk.

    With s the student logits [C, V_s], p = softmax(t / T) the teacher over the first V_kd columns,
    q = softmax(s[:, :V_kd] / T), r = kd_ratio and N = num_tokens:

        loss       = ((1 - r) sum CE + r T^2 sum KL(p || q)) / N
        d loss/ds  = ((1 - r)(softmax(s) - onehot(target)) + r T (q - p) on the first V_kd columns) / N

    The gradient w.r.t. the chunk's logits is then back-propagated through the lm_head into
    ``loop.grads``.
    """
    plan, head, bias, loss_dtype, grads = loop.plan, loop.head, loop.bias, loop.loss_dtype, loop.grads
    buffers = loop.scratch
    assert buffers is not None, "the analytic chunk runs on the loop's scratch buffers"
    n = stop - start
    h = loop.hidden[start:stop].detach()  # [C, H_s]
    want_grad = grads.hidden is not None or grads.head is not None or grads.bias is not None
    r, temp, kvs = plan.options.kd_ratio, plan.options.temperature, plan.options.kd_vocab_size
    targets = plan.targets[start:stop]  # [C]
    s = _linear_into(buffers.logits[:n], h.to(plan.student_dtype), head)  # [C, V_s], edited in place
    if bias is not None:
        s += bias.to(loss_dtype)
    picked = s.gather(1, targets[:, None]).squeeze(1)  # [C] the targets' logits
    if not isinstance(plan.teacher, _DenseTeacher):
        # CE alone (r = 0): the logsumexp runs in place of the logits, whose softmax is then one division
        # away, so the chunk needs no other [C, V] buffer.
        lse_s, total = _logsumexp_(s)
        ce = (lse_s - picked).sum()
        if want_grad:
            _add_logit_grads(loop, start, stop, s.div_(total[:, None]), h)
        return ce, ce.new_zeros(())

    assert buffers.work is not None and buffers.teacher is not None
    work = buffers.work[:n]  # [C, V_s]
    lse_s, _ = _logsumexp_(work.copy_(s))  # [C]
    ce = (lse_s - picked).sum()
    s_kd = s if kvs is None else s[:, :kvs]  # [C, V_kd] view
    lse_q = lse_s
    if temp != 1.0 or kvs is not None:
        lse_q, _ = _logsumexp_(torch.div(s_kd, temp, out=work[:, : s_kd.shape[1]]))  # [C]
    log_ratio = _teacher_chunk_logits(plan.teacher, start, stop, loss_dtype, out=buffers.teacher[:n])
    if temp != 1.0:
        log_ratio /= temp
    p = work[:, : log_ratio.shape[1]].copy_(log_ratio)  # [C, V_kd], in the workspace
    lse_t, total = _logsumexp_(p)
    p.div_(total[:, None])  # softmax(t / T)
    log_ratio -= lse_t[:, None]  # log p
    # log p - log q in place. A -inf log p (p = 0) is clamped first so that its term is 0 * finite.
    log_ratio.clamp_(min=torch.finfo(loss_dtype).min)
    log_ratio.sub_(s_kd, alpha=1.0 / temp).add_(lse_q[:, None])
    # Row-wise dot products through bmm: (p * log_ratio).sum(-1) would allocate another [C, V_kd].
    kd = torch.bmm(p[:, None, :], log_ratio[:, :, None]).sum() * temp**2
    if not want_grad:
        return ce, kd

    if temp == 1.0 and kvs is None:
        # (1 - r) softmax + r (softmax - p) = softmax - r p
        g = s.sub_(lse_s[:, None]).exp_().add_(p, alpha=-r)
    else:
        # q = softmax(s_kd / T) in the teacher's buffer (its log-ratio is spent), before s is overwritten
        q = torch.div(s_kd, temp, out=log_ratio).sub_(lse_q[:, None]).exp_()  # [C, V_kd]
        g = s.sub_(lse_s[:, None]).exp_()  # softmax(s), in place of the logits
        if r != 0.0:
            g.mul_(1.0 - r)
        g_kd = g if kvs is None else g[:, :kvs]
        g_kd.add_(q, alpha=r * temp).add_(p, alpha=-r * temp)
    _add_logit_grads(loop, start, stop, g, h)
    return ce, kd


def _add_logit_grads(loop: _Loop, start: int, stop: int, g: Tensor, h: Tensor) -> None:
    """Finish the chunk's logit gradient ``g`` [C, V_s] (consumed; all but the one-hot term and the 1/N)
    and back-propagate it through the lm_head into ``loop.grads``."""
    plan = loop.plan
    targets = plan.targets[start:stop]
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows, targets] -= 1.0 - plan.options.kd_ratio
    g /= _detached(plan.num_tokens)
    _add_linear_grads(loop.grads, start, stop, g, h, loop.head, plan.student_dtype)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` [C, V] written into ``out`` (``out``'s dtype) and returned: computed there
    when the dtypes agree (the same matmul ``F.linear`` runs), else cast into it."""
    if x.dtype == out.dtype:
        return torch.mm(x, weight.t(), out=out)
    return out.copy_(F.linear(x, weight))


def _logsumexp_(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.logsumexp(x, -1)`` of x [C, V] and ``sum(exp(x - max))`` [C], overwriting x with
    ``exp(x - max)`` (so softmax is one division away) instead of allocating a [C, V] temporary.

    Rows whose max is infinite are shifted by 0, as torch.logsumexp does: all -inf gives -inf, +inf
    gives inf."""
    top = x.amax(dim=-1, keepdim=True)  # [C, 1]
    top.masked_fill_(top.isinf(), 0.0)
    total = x.sub_(top).exp_().sum(dim=-1)  # [C]
    return total.log() + top.squeeze(-1), total


def _add_linear_grads(
    grads: _Grads, start: int, stop: int, g: Tensor, h: Tensor, head: Tensor, dtype: torch.dtype
) -> None:
    """Back-propagate the chunk's logit gradient ``g`` [C, V_s] (consumed) through ``F.linear(h, head)``,
    with the same casts as autograd through ``F.linear(h.to(dtype), head)`` would make."""
    if grads.bias is not None:
        grads.bias += g.sum(dim=0)
    g_mm = g.to(dtype)
    del g
    if grads.hidden is not None:
        grads.hidden[start:stop] = g_mm @ head
    if grads.head is not None and grads.head.dtype == g_mm.dtype:
        grads.head.addmm_(g_mm.T, h.to(dtype))  # no [V, H] temporary
    elif grads.head is not None:
        grads.head += g_mm.T @ h.to(dtype)


def _teacher_chunk_logits(
    teacher: _DenseTeacher, start: int, stop: int, loss_dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """The teacher's logits for tokens [start, stop), [C, V_kd] in the loss dtype; never in a graph.
    Written into ``out`` (a [C, V_kd] buffer of the loss dtype) when one is given."""
    with torch.no_grad():
        # Slicing/reading an inference-mode tensor is allowed here; the result is a normal tensor.
        th = teacher.hidden[start:stop].to(teacher.dtype)  # [C, H_t]
        if out is None:
            logits = F.linear(th, teacher.head).to(loss_dtype)  # [C, V_kd]
        else:
            logits = _linear_into(out, th, teacher.head)
        if teacher.bias is not None:
            logits += teacher.bias.to(loss_dtype)
        if teacher.softcap is None:
            return logits
        capped = softcap(logits, teacher.softcap)
        return capped if out is None else out.copy_(capped)


class _ChunkedDistill(torch.autograd.Function):
    """Liger-style fused linear + loss: the gradients are computed chunk by chunk during the forward
    (while each chunk's logits exist anyway) and stored; backward only scales them by grad_output."""

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_head: Tensor,
        student_bias: Tensor | None,
        plan: _ChunkPlan,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        loss, ce_sum, kd_sum, g_hidden, g_head, g_bias = _chunk_loop(
            plan, student_hidden, student_head, student_bias, needs
        )
        ctx.save_for_backward(g_hidden, g_head, g_bias)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor, _grad_ce: Tensor | None, _grad_kd: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # Out of place (not ``mul_``) so that a second backward through a retained graph stays right.
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (*scaled, None, None)
