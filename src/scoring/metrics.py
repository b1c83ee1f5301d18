"""Detection metrics for parsed grounding answers: IoU, one-to-one matching, P/R/F1, COCO mAP.

Pure Python apart from COCO mAP, which goes through pycocotools (imported only when mAP is computed, so
this module loads without it). Boxes are :class:`src.data.boxes.Box` in pixels of the original image.

Conventions, chosen once here so every report agrees:

* IoU of two boxes whose union has no area is 0.0, even for two identical degenerate boxes.
* A match needs IoU >= the threshold (inclusive, as in COCO) and, unless ``class_agnostic``, equal labels.
* Division by zero gives 0.0, as scikit-learn's ``zero_division=0``: precision with no predictions,
  recall with no ground truth, F1 when precision + recall is 0, mean IoU with no matched pair, parse rate
  with no samples.
* mAP is COCO's (101-point interpolated AP, mean over labels that have ground truth). A label only ever
  predicted has no AP and so does not lower mAP; precision and ``per_label`` still count those false
  positives. With no predictions at all mAP is 0.0; with no ground truth at all mAP is undefined for COCO
  and reported as 0.0. Predictions without a score rank with a constant score of 1.0.
* Crowd regions (COCO ``iscrowd``, VOC ``difficult``; a sample's optional fourth element) are ignored as
  pycocotools ignores them: a prediction left unmatched by the real boxes that lies on a crowd region of
  its label (intersection over the *prediction's* area >= the threshold, COCO's crowd overlap) is neither
  a true nor a false positive, and a crowd region is never a miss. mAP hands them to pycocotools as
  ``iscrowd: 1``.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from src.data.boxes import Box

# (predictions, ground truth, answer parsed[, crowd regions]) for one image
Sample = tuple[list[Box], list[Box], bool] | tuple[list[Box], list[Box], bool, list[Box]]
Parts = tuple[list[Box], list[Box], bool, list[Box]]  # a Sample with its crowd regions, maybe none
# COCO's object sizes by box area in pixels of the original image: small < 32^2 <= medium < 96^2 <= large.
SIZES = (("small", 32**2), ("medium", 96**2), ("large", float("inf")))


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; 0.0 when the union has no area."""
    inter_w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    inter_h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = inter_w * inter_h
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def crowd_overlap(pred: Box, region: Box) -> float:
    """How much of `pred` lies inside a crowd region: pycocotools' IoU against an iscrowd box."""
    inter_w = max(0.0, min(pred.x2, region.x2) - max(pred.x1, region.x1))
    inter_h = max(0.0, min(pred.y2, region.y2) - max(pred.y1, region.y1))
    area = (pred.x2 - pred.x1) * (pred.y2 - pred.y1)
    return inter_w * inter_h / area if area > 0 else 0.0


def sample_parts(sample: Sample) -> Parts:
    """(predictions, truths, parsed, crowd regions) of a sample with or without its crowd regions."""
    preds, truths, parsed, *crowd = sample
    return preds, truths, parsed, (crowd[0] if crowd else [])


@dataclass(frozen=True)
class Matching:
    """Result of :func:`match_boxes`; every entry is an index into the lists passed in."""

    pairs: list[tuple[int, int, float]]  # (prediction, truth, IoU), in the order they were matched
    unmatched_preds: list[int]  # false positives: not matched, and not on a crowd region
    unmatched_truths: list[int]
    ignored_preds: list[int] = field(default_factory=list)  # unmatched, but on a crowd region

    def counted_preds(self, total: int) -> int:
        """Predictions that count in precision: all of them but those on crowd regions."""
        return total - len(self.ignored_preds)


def match_boxes(
    preds: list[Box],
    truths: list[Box],
    iou_threshold: float = 0.5,
    class_agnostic: bool = False,
    crowd: Sequence[Box] = (),
) -> Matching:
    """Greedy one-to-one matching: repeatedly take the highest-IoU pair whose boxes are both still free.

    Greedy by IoU rather than by score, because parsed answers often carry no score; ties go to the
    lower prediction index, then the lower truth index, so results are deterministic. Predictions left
    over that lie on a `crowd` region (see the module docstring) are `ignored_preds`, as COCO matches
    real boxes first and crowd regions only after.
    """
    candidates = [
        (overlap, p, t)
        for p, pred in enumerate(preds)
        for t, truth in enumerate(truths)
        if (class_agnostic or pred.label == truth.label) and (overlap := iou(pred, truth)) >= iou_threshold
    ]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    pairs: list[tuple[int, int, float]] = []
    used_preds: set[int] = set()
    used_truths: set[int] = set()
    for overlap, p, t in candidates:
        if p not in used_preds and t not in used_truths:
            pairs.append((p, t, overlap))
            used_preds.add(p)
            used_truths.add(t)
    leftover = [p for p in range(len(preds)) if p not in used_preds]
    ignored = [
        p
        for p in leftover
        if any(
            (class_agnostic or preds[p].label == region.label)
            and crowd_overlap(preds[p], region) >= iou_threshold
            for region in crowd
        )
    ]
    return Matching(
        pairs,
        [p for p in leftover if p not in ignored],
        [t for t in range(len(truths)) if t not in used_truths],
        ignored,
    )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _prf(tp: int, n_preds: int, n_truths: int) -> tuple[float, float, float]:
    precision, recall = _ratio(tp, n_preds), _ratio(tp, n_truths)
    return precision, recall, _ratio(2 * precision * recall, precision + recall)


def size_of(box: Box) -> str:
    """COCO's size name of a box ("small", "medium", "large") by its area in pixels."""
    area = max(0.0, box.x2 - box.x1) * max(0.0, box.y2 - box.y1)
    return next(name for name, limit in SIZES if area < limit)


def per_size_metrics(samples: Sequence[Sample], iou_threshold: float = 0.5) -> dict:
    """{size: {precision, recall, f1, support}} for COCO's small / medium / large boxes.

    As COCO does, a match counts in its ground-truth box's size and an unmatched prediction in its own;
    support is the number of ground-truth boxes of that size. Labels must match, as in the headline P/R/F1.
    """
    tp: Counter[str] = Counter()
    preds: Counter[str] = Counter()
    truths: Counter[str] = Counter()
    for sample in samples:
        predicted, true, _, crowd = sample_parts(sample)
        matching = match_boxes(predicted, true, iou_threshold, crowd=crowd)
        for _, t, _ in matching.pairs:
            tp[size_of(true[t])] += 1
            preds[size_of(true[t])] += 1
        preds.update(size_of(predicted[p]) for p in matching.unmatched_preds)
        truths.update(size_of(b) for b in true)
    out = {}
    for name, _ in SIZES:
        p, r, f = _prf(tp[name], preds[name], truths[name])
        out[name] = {"precision": p, "recall": r, "f1": f, "support": truths[name], "predicted": preds[name]}
    return out


def coco_map(samples: Sequence[Sample]) -> tuple[float, float]:
    """COCO box mAP as (mAP@0.5, mAP@[0.5:0.95]); 0.0 for both with no predictions or no ground truth."""
    return _coco_map([sample_parts(sample) for sample in samples])


def _coco_map(samples: list[Parts]) -> tuple[float, float]:
    has_preds = any(preds for preds, *_ in samples)
    has_truths = any(truths for _, truths, *_ in samples)
    if not (has_preds and has_truths):  # pycocotools fails on no results and returns -1 on no ground truth
        return 0.0, 0.0
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({b.label for preds, truths, _, crowd in samples for b in (*preds, *truths, *crowd)})
    category = {label: i for i, label in enumerate(labels, start=1)}

    def xywh(b: Box) -> list[float]:
        return [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]

    truths = [
        (image, b, crowd)
        for image, (_, ts, _, regions) in enumerate(samples, start=1)
        for crowd, boxes in ((0, ts), (1, regions))
        for b in boxes
    ]
    dataset = {
        "images": [{"id": image} for image in range(1, len(samples) + 1)],
        "categories": [{"id": i, "name": label} for label, i in category.items()],
        # Annotation ids start at 1: COCOeval treats id 0 as "not matched".
        "annotations": [
            {
                "id": i,
                "image_id": image,
                "category_id": category[b.label],
                "bbox": xywh(b),
                "area": (b.x2 - b.x1) * (b.y2 - b.y1),
                "iscrowd": crowd,
            }
            for i, (image, b, crowd) in enumerate(truths, start=1)
        ],
    }
    detections = [
        {
            "image_id": image,
            "category_id": category[b.label],
            "bbox": xywh(b),
            "score": 1.0 if b.score is None else b.score,
        }
        for image, (ps, *_) in enumerate(samples, start=1)
        for b in ps
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0] is AP@[.5:.95], stats[1] AP@.5; -1 means "undefined", which we report as 0.0.
    return max(float(evaluator.stats[1]), 0.0), max(float(evaluator.stats[0]), 0.0)


def detection_metrics(samples: Sequence[Sample], iou_threshold: float = 0.5) -> dict:
    """Metrics over a list of (preds, truths, parsed[, crowd]) per image; counts are micro-averaged.

    Keys: num_images, parse_rate, mean_iou (of matched pairs), precision, recall, f1, tp, fp, fn
    (all at ``iou_threshold``), ignored (predictions on crowd regions, in neither tp nor fp), map_50,
    map_50_95 (COCO), per_label: {label: {precision, recall, f1, support}} where support is the label's
    number of ground-truth boxes, and per_size (see :func:`per_size_metrics`).
    """
    matched_ious: list[float] = []
    tp_by_label: Counter[str] = Counter()
    preds_by_label: Counter[str] = Counter()
    truths_by_label: Counter[str] = Counter()
    ignored = 0
    for sample in samples:
        preds, truths, _, crowd = sample_parts(sample)
        matching = match_boxes(preds, truths, iou_threshold, crowd=crowd)
        matched_ious += [overlap for _, _, overlap in matching.pairs]
        tp_by_label.update(truths[t].label for _, t, _ in matching.pairs)
        ignored += len(matching.ignored_preds)
        preds_by_label.update(b.label for p, b in enumerate(preds) if p not in matching.ignored_preds)
        truths_by_label.update(b.label for b in truths)
    tp, n_preds, n_truths = len(matched_ious), preds_by_label.total(), truths_by_label.total()
    precision, recall, f1 = _prf(tp, n_preds, n_truths)
    map_50, map_50_95 = coco_map(samples)
    per_label = {}
    for label in sorted(preds_by_label | truths_by_label):
        p, r, f = _prf(tp_by_label[label], preds_by_label[label], truths_by_label[label])
        per_label[label] = {"precision": p, "recall": r, "f1": f, "support": truths_by_label[label]}
    return {
        "num_images": len(samples),
        "parse_rate": _ratio(sum(sample_parts(sample)[2] for sample in samples), len(samples)),
        "mean_iou": _ratio(sum(matched_ious), len(matched_ious)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": n_preds - tp,
        "fn": n_truths - tp,
        "ignored": ignored,
        "map_50": map_50,
        "map_50_95": map_50_95,
        "per_label": per_label,
        "per_size": per_size_metrics(samples, iou_threshold),
    }
