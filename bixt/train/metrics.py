"""Dense-prediction metrics: per-token accuracy, class-mean IoU and, for part segmentation, ShapeNetPart's instance
and category mIoU.

SegmentationMeter keeps only sums (a confusion matrix, per-category sums of shape mIoU and shape counts), so the
metrics of a data set split over processes are those of the whole: call `sync()` once after the last update and
before `compute()`; it all-reduces (SUM) `state()` over the default (or given) process group. It does not rely on
torchmetrics' own syncing, which would need every process to construct its metric objects in the same order.
Under token sharding, update the meter on one process per sample only (bixt.train.distributed.Dist.weight == 1).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from bixt.data.spec import category_of, check_category_parts


class SegmentationMeter:
    """Accumulates predictions of (B, N) points or (B, H, W) pixels against their labels; tokens labelled
    `ignore_index` are not counted. `category_parts` (part segmentation) adds instance_miou and class_miou."""

    def __init__(self, num_classes: int, ignore_index: int = -100,
                 category_parts: Sequence[Sequence[int]] | None = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.category_parts = None
        if category_parts is not None:
            check_category_parts(category_parts, num_classes)
            self.category_parts = tuple(tuple(p) for p in category_parts)
            member = torch.zeros(len(category_parts), num_classes, dtype=torch.bool)
            for c, parts in enumerate(category_parts):
                member[c, list(parts)] = True
            self._member = member  # (categories, classes): which parts each category scores
        self.reset()

    def reset(self) -> None:
        k, c = self.num_classes, len(self.category_parts or ())
        self.confusion = torch.zeros(k, k, dtype=torch.long)  # [target, prediction]
        self.shape_miou_sum = torch.zeros(c, dtype=torch.float64)
        self.shape_count = torch.zeros(c, dtype=torch.float64)  # float64: one dtype for one all-reduce; exact < 2^53

    def state(self) -> list[Tensor]:
        """The tensors whose sums over processes are the whole data set's state (`sync` reduces them)."""
        return [self.confusion, self.shape_miou_sum, self.shape_count]

    def sync(self, group=None) -> None:
        """Sum the state over the processes of `group` (all of them by default); a no-op without torch.distributed.
        Under NCCL the state must live on this process's GPU: update with GPU tensors, or move it before."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            for t in self.state():
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    def _labels(self, pred: Tensor, target: Tensor) -> Tensor:
        """Predicted labels shaped like target: given as labels, or as logits with the class axis last (the dense
        head's (B, N, K)) or second (torch's (B, K, H, W)); last wins when both fit."""
        if pred.dim() == target.dim():
            return pred.long()
        if pred.dim() == target.dim() + 1:
            if pred.shape[:-1] == target.shape and pred.shape[-1] == self.num_classes:
                return pred.argmax(-1)
            if pred.shape[0] == target.shape[0] and pred.shape[2:] == target.shape[1:] and \
                    pred.shape[1] == self.num_classes:
                return pred.argmax(1)
        raise ValueError(f"predictions {tuple(pred.shape)} do not fit labels {tuple(target.shape)}: give labels of "
                         f"the same shape or logits with {self.num_classes} classes on the last (or second) axis")

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: labels shaped like target, or logits (see `_labels`); target: (B, N) or (B, H, W) class ids."""
        pred = self._labels(pred.detach(), target)
        target = target.long()
        if self.confusion.device != target.device:
            self.to(target.device)
        # torchmetrics drops ignore_index tokens (their predictions too) before counting
        self.confusion += multiclass_confusion_matrix(pred.flatten(), target.flatten(), self.num_classes,
                                                      ignore_index=self.ignore_index, validate_args=False).long()
        if self.category_parts is not None:
            self._update_shapes(pred.flatten(1), target.flatten(1))

    def _update_shapes(self, pred: Tensor, target: Tensor) -> None:
        # ShapeNetPart's rule: per shape, the IoU of every part of its category over its non-void points (a part in
        # neither prediction nor label scores 1), averaged over the parts; predictions of other categories' parts
        # only count as misses
        b, k = target.shape[0], self.num_classes
        cat = category_of(target, self.category_parts, self.ignore_index)
        valid = target != self.ignore_index
        rows = torch.arange(b, device=target.device)[:, None].expand_as(target)[valid] * k

        def counts(ids: Tensor) -> Tensor:
            return torch.bincount(rows + ids, minlength=b * k).view(b, k).double()

        t, p = target[valid], pred[valid].clamp(0, k - 1)  # out-of-range predictions would index other shapes
        hit = p == t
        inter = torch.bincount(rows[hit] + t[hit], minlength=b * k).view(b, k).double()
        union = counts(t) + counts(p) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        scored = cat >= 0
        member = self._member[cat[scored]]
        shape_miou = (iou[scored] * member).sum(1) / member.sum(1)
        self.shape_miou_sum.index_add_(0, cat[scored], shape_miou)
        self.shape_count.index_add_(0, cat[scored], torch.ones_like(shape_miou))

    def to(self, device) -> SegmentationMeter:
        self.confusion, self.shape_miou_sum, self.shape_count = (t.to(device) for t in self.state())
        if self.category_parts is not None:
            self._member = self._member.to(device)
        return self

    def compute(self) -> dict[str, float]:
        """pixel_acc (correct / non-void tokens), miou (IoU averaged over the classes present in labels or
        predictions), and with category_parts instance_miou (mean over shapes of their part-mean IoU) and
        class_miou (mean over the categories seen of their shapes' mean). NaN where nothing was counted."""
        cm = self.confusion.double()
        inter, union = cm.diag(), cm.sum(0) + cm.sum(1) - cm.diag()
        present = union > 0
        nan = float("nan")
        out = {"pixel_acc": (inter.sum() / cm.sum()).item() if cm.sum() > 0 else nan,
               "miou": (inter[present] / union[present]).mean().item() if present.any() else nan}
        if self.category_parts is not None:
            seen = self.shape_count > 0
            out["instance_miou"] = (self.shape_miou_sum.sum() / self.shape_count.sum()).item() if seen.any() else nan
            out["class_miou"] = (self.shape_miou_sum[seen] / self.shape_count[seen]).mean().item() \
                if seen.any() else nan
        return out
