"""95% intervals by bootstrap over test images, and paired differences that say who really won.

Torch-free (numpy only), so the launcher's report can use it:

    from src.scoring.bootstrap import ImageScores, intervals, paired_difference
    r4 = ImageScores.from_rows(rows_of("r4/predictions.jsonl"))
    r1 = ImageScores.from_rows(rows_of("r1/predictions.jsonl"))
    intervals([r4])                    # {"f1": {"value", "low", "high"}, ...}
    paired_difference([r4], [r1])      # {"f1": {"difference", "low", "high", "significant"}, ...}

How: every resample draws the test images with replacement (the same draws for both sides of a paired
difference) and recomputes each metric from per-image counts, as `src.scoring.metrics.detection_metrics`
does on the whole set: precision, recall and F1 from the summed TP/FP/FN, mean IoU over the matched pairs,
parse rate over images. mAP@0.5 and mAP@[.5:.95] are COCO's (101-point interpolated AP, mean over labels
with ground truth), recomputed per resample here in numpy from each detection's COCO match, because
pycocotools takes ~50 ms a call: on the whole set this equals `coco_map`. Crowd regions (a row's
"crowd", a sample's fourth element) are ignored as there: predictions on them are neither TP nor FP.
The interval is the percentile one (2.5th and 97.5th of the resampled values); a difference is
significant when its interval excludes 0.

An "entry" is a list of ImageScores: one model, or the seeds of one recipe, whose metric is then the mean
over seeds of each seed's metric on the same resampled images (the image bootstrap of a seed mean; the
seed spread itself is reported beside it, not folded in). The RNG seed is fixed, so reports reproduce.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from src.data.boxes import Box
from src.scoring.metrics import crowd_overlap, iou, match_boxes, sample_parts

RESAMPLES, SEED, LEVEL = 1000, 0, 0.95
METRIC_KEYS = ("precision", "recall", "f1", "map_50", "map_50_95", "mean_iou", "parse_rate")
# COCO's IoU thresholds and recall points, built as pycocotools builds them (same floats).
COCO_IOUS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
COCO_RECALLS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_MAX_DETS = 100  # per image and label, as COCO's largest maxDets
BLOCK = 100  # resamples computed together: bounds memory at BLOCK x detections x 10 floats


def box_from_json(item: dict) -> Box:
    """A Box from a predictions.jsonl entry ({label, x1, y1, x2, y2[, score]})."""
    return Box(
        str(item.get("label", "")),
        float(item["x1"]),
        float(item["y1"]),
        float(item["x2"]),
        float(item["y2"]),
        item.get("score"),
    )


def samples_from_rows(
    rows: list[dict],
) -> tuple[list[str], list[tuple[list[Box], list[Box], bool, list[Box]]]]:
    """(image keys, samples) from predictions.jsonl rows; a repeated image gets '#2', '#3'... keys."""
    keys: list[str] = []
    samples: list[tuple[list[Box], list[Box], bool, list[Box]]] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        name = str(row.get("image", index))
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        preds = [box_from_json(b) for b in row.get("predictions") or []]
        truths = [box_from_json(b) for b in row.get("truths") or []]
        crowd = [box_from_json(b) for b in row.get("crowd") or []]
        samples.append((preds, truths, bool(row.get("parsed")), crowd))
    return keys, samples


def coco_detections(
    preds: list[Box], truths: list[Box], crowd: Sequence[Box] = ()
) -> list[tuple[str, float, np.ndarray, np.ndarray]]:
    """(label, score, matched, ignored) per kept detection, in COCO's order; the last two hold one flag
    per COCO IoU threshold.

    Mirrors COCOeval.evaluateImg for one image: per label, detections by descending score (stable, at
    most 100), each taking the still-free truth of highest IoU >= the threshold (a later truth wins a tie);
    failing that, the crowd region it overlaps most (crowd_overlap >= the threshold; a crowd region takes
    any number), which makes it ignored.
    """
    out = []
    for label in dict.fromkeys(b.label for b in preds):
        mine = [b for b in preds if b.label == label]
        order = sorted(range(len(mine)), key=lambda i: -_score(mine[i]))[:COCO_MAX_DETS]
        gts = [t for t in truths if t.label == label]
        regions = [r for r in crowd if r.label == label]
        taken = np.zeros((len(COCO_IOUS), len(gts)), dtype=bool)
        for d in order:
            overlaps = [iou(mine[d], g) for g in gts]
            on_crowd = max((crowd_overlap(mine[d], r) for r in regions), default=0.0)
            hits = np.zeros(len(COCO_IOUS), dtype=bool)
            ignored = np.zeros(len(COCO_IOUS), dtype=bool)
            for t, threshold in enumerate(COCO_IOUS):
                best, match = min(threshold, 1 - 1e-10), -1
                for g, overlap in enumerate(overlaps):
                    if taken[t, g] or overlap < best:
                        continue
                    best, match = overlap, g
                if match >= 0:
                    taken[t, match], hits[t] = True, True
                else:
                    ignored[t] = on_crowd >= min(threshold, 1 - 1e-10)
            out.append((label, _score(mine[d]), hits, ignored))
    return out


def _score(box: Box) -> float:
    return 1.0 if box.score is None else float(box.score)


@dataclass(frozen=True)
class ImageScores:
    """Per-image counts of one model's predictions, ready to be reweighted by resamples."""

    keys: tuple[str, ...]
    tp: np.ndarray  # per image: matches at IoU 0.5 with equal labels (src.scoring.metrics.match_boxes)
    n_pred: np.ndarray  # predictions not on a crowd region
    n_truth: np.ndarray
    iou_sum: np.ndarray  # summed IoU of those matches
    parsed: np.ndarray
    labels: tuple[str, ...]  # every label predicted or true, sorted (COCO's categories)
    truths_per_label: np.ndarray  # images x labels
    det_image: np.ndarray  # per kept detection (COCO's matching), in image order
    det_label: np.ndarray
    det_score: np.ndarray
    det_hits: np.ndarray  # detections x COCO IoU thresholds
    det_ignored: np.ndarray  # detections x COCO IoU thresholds: on a crowd region, neither TP nor FP

    @classmethod
    def from_rows(cls, rows: list[dict]) -> ImageScores:
        keys, samples = samples_from_rows(rows)
        return cls.from_samples(samples, keys)

    @classmethod
    def from_samples(cls, samples: list, keys: Sequence[str] | None = None) -> ImageScores:
        keys = tuple(keys) if keys is not None else tuple(str(i) for i in range(len(samples)))
        samples = [sample_parts(sample) for sample in samples]
        labels = tuple(sorted({b.label for preds, truths, *_ in samples for b in (*preds, *truths)}))
        column = {label: i for i, label in enumerate(labels)}
        counts = np.zeros((len(samples), 5))
        truths_per_label = np.zeros((len(samples), len(labels)))
        det_image, det_label, det_score, det_hits, det_ignored = [], [], [], [], []
        for image, (preds, truths, parsed, crowd) in enumerate(samples):
            matching = match_boxes(preds, truths, crowd=crowd)
            pairs, counted = matching.pairs, matching.counted_preds(len(preds))
            counts[image] = (len(pairs), counted, len(truths), sum(o for *_, o in pairs), bool(parsed))
            for truth in truths:
                truths_per_label[image, column[truth.label]] += 1
            for label, score, hits, ignored in coco_detections(preds, truths, crowd):
                det_image.append(image)
                det_label.append(column[label])
                det_score.append(score)
                det_hits.append(hits)
                det_ignored.append(ignored)
        return cls(  # type: ignore[call-arg]  # counts.T unpacks into the five per-image arrays
            keys,
            *counts.T,
            labels,
            truths_per_label,
            np.asarray(det_image, dtype=np.int64),
            np.asarray(det_label, dtype=np.int64),
            np.asarray(det_score, dtype=float),
            np.asarray(det_hits, dtype=float).reshape(-1, len(COCO_IOUS)),
            np.asarray(det_ignored, dtype=float).reshape(-1, len(COCO_IOUS)),
        )

    def subset(self, keys: Sequence[str]) -> ImageScores:
        """The same scores restricted to (and reordered as) `keys`."""
        position = {key: i for i, key in enumerate(self.keys)}
        index = np.asarray([position[key] for key in keys], dtype=np.int64)
        new_index = np.full(len(self.keys), -1)
        new_index[index] = np.arange(len(index))
        kept = new_index[self.det_image] >= 0
        order = np.argsort(new_index[self.det_image][kept], kind="stable")
        return ImageScores(
            tuple(keys),
            self.tp[index],
            self.n_pred[index],
            self.n_truth[index],
            self.iou_sum[index],
            self.parsed[index],
            self.labels,
            self.truths_per_label[index],
            new_index[self.det_image][kept][order],
            self.det_label[kept][order],
            self.det_score[kept][order],
            self.det_hits[kept][order],
            self.det_ignored[kept][order],
        )


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=float), where=denominator > 0)


def metric_values(scores: ImageScores, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric under each row of `weights` (resamples x images: how often each image was drawn)."""
    tp, n_pred, n_truth = weights @ scores.tp, weights @ scores.n_pred, weights @ scores.n_truth
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_truth)
    map_50, map_50_95 = coco_map_values(scores, weights)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "map_50": map_50,
        "map_50_95": map_50_95,
        "mean_iou": _ratio(weights @ scores.iou_sum, tp),
        "parse_rate": _ratio(weights @ scores.parsed, weights.sum(axis=1)),
    }


def coco_map_values(scores: ImageScores, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mAP@0.5, mAP@[.5:.95]) per row of weights, as src.scoring.metrics.coco_map gives on the whole set.

    An image drawn k times counts k times; its copies sit together in the ranking, which is one valid
    order of a resample's images (COCO ranks equal scores in image order).
    """
    per_label = np.full((len(weights), len(scores.labels), len(COCO_IOUS)), np.nan)
    for label in range(len(scores.labels)):
        truths = weights @ scores.truths_per_label[:, label]
        mine = np.flatnonzero(scores.det_label == label)
        mine = mine[np.argsort(-scores.det_score[mine], kind="stable")]
        per_label[:, label] = _label_ap(
            weights[:, scores.det_image[mine]], scores.det_hits[mine], truths, scores.det_ignored[mine]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no truth at all
        mean_50 = np.nan_to_num(np.nanmean(per_label[:, :, 0], axis=1), nan=0.0)
        mean_all = np.nan_to_num(np.nanmean(per_label.mean(axis=2), axis=1), nan=0.0)
    # coco_map reports 0.0 when there are no predictions at all (pycocotools cannot run then).
    no_predictions = weights @ scores.n_pred == 0
    return np.where(no_predictions, 0.0, mean_50), np.where(no_predictions, 0.0, mean_all)


def _label_ap(
    weights: np.ndarray, hits: np.ndarray, truths: np.ndarray, ignored: np.ndarray | None = None
) -> np.ndarray:
    """AP per (resample, IoU threshold) of one label; NaN where the resample has no truth of it.

    Ignored detections (on crowd regions) keep their place in the ranking but add to neither TP nor FP,
    as in COCOeval.accumulate.
    """
    rows, count = weights.shape
    thresholds = len(COCO_IOUS)
    ap = np.full((rows, thresholds), np.nan)
    has_truth = truths > 0
    if count == 0:
        ap[has_truth] = 0.0
        return ap
    true_pos = np.cumsum(weights[:, :, None] * hits[None], axis=1)  # rows x detections x thresholds
    counted = 1 - hits - (ignored if ignored is not None else 0)
    false_pos = np.cumsum(weights[:, :, None] * counted[None], axis=1)
    recall = true_pos / np.maximum(truths, 1)[:, None, None]  # no truth: no hit either, so 0
    precision = true_pos / (true_pos + false_pos + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    # The envelope at the first detection reaching each recall point; 0 past the curve's end (COCO's).
    curves = np.moveaxis(recall, 1, 2).reshape(-1, count)
    flat_envelope = np.moveaxis(envelope, 1, 2).reshape(-1, count)
    local = np.stack([np.searchsorted(curve, COCO_RECALLS, side="left") for curve in curves])
    reached = local < count
    picked = np.where(reached, np.take_along_axis(flat_envelope, np.minimum(local, count - 1), axis=1), 0.0)
    ap_all = picked.mean(axis=1).reshape(rows, thresholds)
    ap[has_truth] = ap_all[has_truth]
    return ap


def resample_weights(images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """resamples x images: how many times each image is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images))
    flat = (draws + images * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * images).reshape(resamples, images).astype(float)


def entry_values(entry: Sequence[ImageScores], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric of an entry (the mean over its members: the seeds of a recipe) per weight row."""
    values = [metric_values(member, weights) for member in entry]
    return {key: np.mean([v[key] for v in values], axis=0) for key in METRIC_KEYS}


def common_keys(entries: Sequence[Sequence[ImageScores]]) -> list[str]:
    """The images every member of every entry was scored on, in the first member's order."""
    members = [m for entry in entries for m in entry]
    shared = set(members[0].keys).intersection(*(m.keys for m in members[1:]))
    return [key for key in members[0].keys if key in shared]


def _aligned(entries, keys):
    return [[m if m.keys == tuple(keys) else m.subset(keys) for m in entry] for entry in entries]


def _blocks(entry_fn, images: int, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """entry_fn(weights) over all resamples, computed BLOCK rows at a time to bound memory."""
    weights = resample_weights(images, resamples, seed)
    parts = [entry_fn(weights[start : start + BLOCK]) for start in range(0, resamples, BLOCK)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def intervals(
    entry: Sequence[ImageScores], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict[str, dict]:
    """{metric: {value, low, high}}: the value on all images and its bootstrap interval."""
    (entry,) = _aligned([entry], common_keys([entry]))
    images = len(entry[0].keys)
    if images == 0:
        return {}
    full = entry_values(entry, np.ones((1, images)))
    sampled = _blocks(lambda w: entry_values(entry, w), images, resamples, seed)
    out = {}
    for key in METRIC_KEYS:
        low, high = _bounds(sampled[key], level)
        out[key] = {"value": float(full[key][0]), "low": low, "high": high}
    return out


def paired_difference(
    first: Sequence[ImageScores],
    second: Sequence[ImageScores],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, dict]:
    """{metric: {difference, low, high, significant}} of first minus second on the images both scored,
    both recomputed on the same resampled images; significant when the interval excludes 0."""
    keys = common_keys([first, second])
    if not keys:
        return {}
    first, second = _aligned([first, second], keys)
    ones = np.ones((1, len(keys)))
    full_first, full_second = entry_values(first, ones), entry_values(second, ones)

    def differences(weights):
        a, b = entry_values(first, weights), entry_values(second, weights)
        return {key: a[key] - b[key] for key in METRIC_KEYS}

    sampled = _blocks(differences, len(keys), resamples, seed)
    out = {}
    for key in METRIC_KEYS:
        low, high = _bounds(sampled[key], level)
        out[key] = {
            "difference": float(full_first[key][0] - full_second[key][0]),
            "low": low,
            "high": high,
            "significant": bool(low > 0 or high < 0),
            "images": len(keys),
        }
    return out
