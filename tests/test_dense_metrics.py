"""SegmentationMeter: hand-computed IoUs, ignore_index, ShapeNetPart's instance / category mIoU, and a float64
numpy restatement on random inputs."""
import math

import numpy as np
import pytest
import torch

from bixt.train.metrics import SegmentationMeter

V = -100  # void


def test_hand_case_points_with_void():
    target = torch.tensor([[0, 0, 1, 1, 2, V], [2, 2, 2, 0, V, V]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2], [2, 2, 0, 0, 1, 1]])  # predictions on void points never count
    m = SegmentationMeter(4)
    m.update(pred, target)
    out = m.compute()
    # the 9 non-void tokens, numbered 0-4 (first row) and 5-8 (second): 0, 2, 3 | 5, 6, 8 right -> 6
    assert out["pixel_acc"] == pytest.approx(6 / 9)
    # class 0: target {0,1,8}, pred {0,4,7,8} -> I = 2 (0, 8), U = 5 (0,1,4,7,8) -> 2/5
    # class 1: target {2,3}, pred {1,2,3} -> 2/3; class 2: target {4,5,6,7}, pred {5,6} -> 2/4
    # class 3: in neither -> not averaged
    assert out["miou"] == pytest.approx((2 / 5 + 2 / 3 + 2 / 4) / 3)


def test_logits_on_last_or_second_axis_and_accumulation():
    target = torch.tensor([[[0, 1], [1, V]]])  # (B, H, W)
    pred = torch.tensor([[[0, 0], [1, 1]]])
    logits_last = torch.nn.functional.one_hot(pred, 3).float()  # (B, H, W, K)
    logits_second = logits_last.permute(0, 3, 1, 2)  # (B, K, H, W)
    results = []
    for p in (pred, logits_last, logits_second):
        m = SegmentationMeter(3)
        m.update(p, target)
        results.append(m.compute())
    assert results[0] == results[1] == results[2]
    # class 0: I 1, U 2; class 1: I 1, U 2 -> 0.5; accuracy 2/3
    assert results[0] == pytest.approx({"pixel_acc": 2 / 3, "miou": 0.5})
    m = SegmentationMeter(3)
    m.update(pred[:, :1], target[:, :1])
    m.update(pred[:, 1:], target[:, 1:])
    assert m.compute() == pytest.approx(results[0])
    with pytest.raises(ValueError, match="do not fit labels"):
        m.update(torch.zeros(1, 2, 2, 5), target)


def test_all_void_counts_nothing():
    m = SegmentationMeter(3, ignore_index=255, category_parts=((0,), (1, 2)))
    m.update(torch.tensor([[1, 2]]), torch.tensor([[255, 255]]))
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.tensor([[1, 2]]), torch.tensor([[1, 255]]))
    assert m.compute() == {"pixel_acc": 1.0, "miou": 1.0, "instance_miou": 1.0, "class_miou": 1.0}


def test_instance_and_class_miou_hand_case():
    parts = ((0, 1, 2), (3, 4))
    m = SegmentationMeter(5, category_parts=parts)
    # shape A (category 0): part 2 in neither prediction nor label -> IoU 1
    #   part 0: target {0,1}, pred {0} -> 1/2; part 1: target {2,3}, pred {1,2,3} -> 2/3
    # shape B (category 0): part 0 target {0,1,2,3} pred {0,1,2} -> 3/4 (point 3 is predicted 4, another
    #   category's part: a miss for part 0 only); parts 1 and 2 in neither -> 1 each
    # shape C (category 1): part 3 target {0,1} pred {0} -> 1/2, part 4 target {2} pred {1,2} -> 1/2; point 3 void
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [3, 3, 4, V]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 4], [3, 4, 4, 0]])
    m.update(pred, target)
    a, b, c = (1 / 2 + 2 / 3 + 1) / 3, (3 / 4 + 1 + 1) / 3, (1 / 2 + 1 / 2) / 2
    out = m.compute()
    assert out["instance_miou"] == pytest.approx((a + b + c) / 3)
    assert out["class_miou"] == pytest.approx(((a + b) / 2 + c) / 2)
    assert out["pixel_acc"] == pytest.approx(8 / 11)  # right: 3 of A, 3 of B, 2 of C's 3 non-void


def _numpy_meter(preds, targets, k, parts, void):
    """The same metrics, restated in float64 numpy with plain loops."""
    cm = np.zeros((k, k), dtype=np.float64)
    shapes = {c: [] for c in range(len(parts))}
    for p, t in zip(preds, targets, strict=True):
        for pb, tb in zip(p.reshape(len(p), -1), t.reshape(len(t), -1), strict=True):
            keep = tb != void
            for ti, pi in zip(tb[keep], pb[keep], strict=True):
                cm[ti, pi] += 1
            if not keep.any():
                continue
            cat = next(c for c, ps in enumerate(parts) if tb[keep][0] in ps)
            ious = []
            for part in parts[cat]:
                inter = np.sum((pb[keep] == part) & (tb[keep] == part))
                union = np.sum((pb[keep] == part) | (tb[keep] == part))
                ious.append(1.0 if union == 0 else inter / union)
            shapes[cat].append(np.mean(ious))
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    seen = [np.mean(v) for v in shapes.values() if v]
    return {"pixel_acc": inter.sum() / cm.sum(), "miou": np.mean(inter[union > 0] / union[union > 0]),
            "instance_miou": np.mean(sum(shapes.values(), [])), "class_miou": np.mean(seen)}


def test_random_inputs_match_numpy_restatement():
    rng = np.random.default_rng(0)
    parts = ((0, 1, 2, 3), (4, 5), (6, 7, 8), (9,))
    k = 10
    m = SegmentationMeter(k, category_parts=parts)
    preds, targets = [], []
    for _ in range(4):  # several updates accumulate
        cats = rng.integers(0, len(parts), size=6)
        t = np.stack([rng.choice(parts[c], size=50) for c in cats])
        t[rng.random(t.shape) < 0.2] = V
        t[0] = V  # a shape with no label at all is not scored
        # mostly right, sometimes another part, sometimes another category's part
        p = np.where(rng.random(t.shape) < 0.6, np.maximum(t, 0), rng.integers(0, k, size=t.shape))
        logits = torch.nn.functional.one_hot(torch.from_numpy(p), k).float() + torch.rand(*p.shape, k) * 0.5
        m.update(logits, torch.from_numpy(t))
        preds.append(p)
        targets.append(t)
    expected = _numpy_meter(preds, targets, k, parts, V)
    got = m.compute()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_state_sums_are_the_whole_and_sync_is_a_noop_alone():
    rng = np.random.default_rng(1)
    parts = ((0, 1), (2, 3, 4))
    t = torch.from_numpy(np.stack([rng.choice(parts[i % 2], size=20) for i in range(8)]))
    p = torch.from_numpy(rng.integers(0, 5, size=(8, 20)))
    whole, a, b = (SegmentationMeter(5, category_parts=parts) for _ in range(3))
    whole.update(p, t)
    a.update(p[:3], t[:3])
    b.update(p[3:], t[3:])
    for sa, sb in zip(a.state(), b.state(), strict=True):  # what all_reduce(SUM) does across two processes
        sa += sb
    assert a.compute() == pytest.approx(whole.compute())
    before = whole.compute()
    whole.sync()  # no process group: nothing to reduce
    assert whole.compute() == before
    whole.reset()
    assert math.isnan(whole.compute()["miou"])


def test_bad_category_table_is_refused():
    with pytest.raises(ValueError, match="part 1 belongs to 2 categories"):
        SegmentationMeter(3, category_parts=((0, 1), (1, 2)))


def _sync_worker(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        target, pred = _split_case()
        m = SegmentationMeter(5, category_parts=((0, 1), (2, 3, 4)))
        m.update(pred[rank::world], target[rank::world])
        m.sync()
        torch.save(m.compute(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _split_case():
    rng = np.random.default_rng(2)
    target = torch.from_numpy(np.stack([rng.choice(((0, 1), (2, 3, 4))[i % 2], size=16) for i in range(6)]))
    return target, torch.from_numpy(rng.integers(0, 5, size=(6, 16)))


@pytest.mark.slow
def test_sync_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path / "out")), nprocs=2)
    target, pred = _split_case()
    whole = SegmentationMeter(5, category_parts=((0, 1), (2, 3, 4)))
    whole.update(pred, target)
    for rank in range(2):
        assert torch.load(tmp_path / f"out.{rank}") == pytest.approx(whole.compute())
