"""Prediction and evaluation: one prediction per image whatever the model says, files a report can read.

Fast tests drive `predict_records` with scripted answers (perfect, garbage, cut off) and the real
tiny model; the slow one evaluates a real r3 worker output, whose paths are relative to the
worker's working directory and whose adapter sits on a stage-1 merged base.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.data.boxes import Box, format_answer
from src.data.dataset import load_records
from src.data.records import DetectionRecord
from src.eval import evaluate as evaluate_module
from src.eval import predict as predict_module
from src.eval.evaluate import EvaluationError, evaluate_base, evaluate_output, final_model_of, main
from src.eval.predict import (
    GenerationStats,
    answer_lengths,
    batching_order,
    eval_batch_size,
    load_for_eval,
    predict_records,
    resolve_model,
)
from src.planning.evaluation import eval_bytes_per_image
from tests.conftest import REPO

METRIC_KEYS = {"precision", "recall", "f1", "map_50", "map_50_95", "mean_iou", "parse_rate", "tp", "fp", "fn"}
SPEED_KEYS = {"images_per_s", "decoded_tokens_per_s", "decoded_tokens", "decoding_steps", "generate_seconds"}
PREDICTION_KEYS = {"image", "width", "height", "truths", "predictions", "text", "parsed", "malformed"}


@pytest.fixture(scope="module")
def test_records(tiny_data_dir):
    return load_records(str(tiny_data_dir), "test")[0]


@pytest.fixture(scope="module")
def tiny_eval_model(tiny_model_dir):
    return load_for_eval(str(tiny_model_dir), "cpu")


def _scripted(monkeypatch, answer_for):
    """Replace generation by answer_for(index) for the index-th image seen, across batches."""
    seen = []

    def fake_generate(model, processor, images, device, prompt, max_new_tokens, **_):
        start = len(seen)
        seen.extend(images)
        return [answer_for(start + i) for i in range(len(images))]

    monkeypatch.setattr(predict_module, "generate_answers", fake_generate)
    return seen


def test_random_model_gives_one_prediction_per_image_in_order(tiny_eval_model, test_records):
    model, processor, family = tiny_eval_model
    records = test_records[:5]
    predictions = predict_records(model, processor, records, family, "cpu", batch_size=2, max_new_tokens=12)
    assert len(predictions) == len(records)
    for prediction, record in zip(predictions, records, strict=True):
        assert prediction.image == str(record.image)
        assert prediction.truths == record.boxes
        assert (prediction.width, prediction.height) == (record.width, record.height)
        assert isinstance(prediction.text, str) and prediction.text  # random weights still say something
        assert prediction.parsed is bool(prediction.boxes) or prediction.text.strip() == "none"


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_eval_model, test_records):
    # Left padding must not change what a greedy model answers (right padding would).
    from PIL import Image

    model, processor, family = tiny_eval_model
    small = Image.open(test_records[1].image).convert("RGB").resize((56, 56))
    records = [test_records[0], DetectionRecord(small, 56, 56, [], "small"), test_records[2]]
    together = predict_records(model, processor, records, family, "cpu", batch_size=3, max_new_tokens=10)
    alone = predict_records(model, processor, records, family, "cpu", batch_size=1, max_new_tokens=10)
    assert [p.text for p in together] == [p.text for p in alone]
    assert together[1].image == "small"  # a record with an in-memory image is named by `where`
    assert processor.tokenizer.padding_side == "right"  # restored for training


def test_garbage_and_truncated_answers_count_as_unparsed_never_raise(monkeypatch, test_records):
    record = test_records[0]
    perfect = format_answer(record.boxes, record.width, record.height)
    answers = [
        perfect,
        perfect[: perfect.index("<|box_end|>") - 3],  # cut off mid-box, as max_new_tokens does
        "",
        "<|box_start|><|box_start|>(((,,,)))" * 3,
        "\x00\ufffd<|im_end|>",
    ]
    _scripted(monkeypatch, lambda i: answers[i])
    predictions = predict_records(None, None, [record] * len(answers), batch_size=2)
    assert [p.parsed for p in predictions] == [True, False, False, False, False]
    assert predictions[0].boxes and all(not p.boxes for p in predictions[1:])
    assert predictions[1].malformed == 1


def test_perfect_answers_score_precision_one_through_the_whole_evaluation(
    monkeypatch, tiny_model_dir, tiny_data_dir, test_records, tmp_path
):
    _scripted(
        monkeypatch,
        lambda i: format_answer(test_records[i].boxes, test_records[i].width, test_records[i].height),
    )
    metrics = evaluate_base(str(tiny_model_dir), str(tiny_data_dir), tmp_path, max_samples=4)
    assert metrics["precision"] == metrics["recall"] == metrics["parse_rate"] == 1.0
    assert metrics["class_agnostic"]["precision"] == 1.0 and metrics["eval"]["num_samples"] == 4
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]) == PREDICTION_KEYS
    assert lines[0]["truths"][0]["label"] == test_records[0].boxes[0].label


def test_wrong_labels_score_zero_but_class_agnostic_sees_the_boxes(
    monkeypatch, tiny_model_dir, tiny_data_dir, test_records, tmp_path
):
    def renamed(i):
        record = test_records[i]
        boxes = [Box("purple circle", b.x1, b.y1, b.x2, b.y2) for b in record.boxes]
        return format_answer(boxes, record.width, record.height)

    _scripted(monkeypatch, renamed)
    metrics = evaluate_base(str(tiny_model_dir), str(tiny_data_dir), tmp_path, max_samples=3)
    assert metrics["precision"] == 0.0 and metrics["class_agnostic"]["precision"] == 1.0


def test_cli_base_writes_metrics_and_predictions(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "base"
    code = main(
        [str(out), "--base", str(tiny_model_dir), "--dataset", str(tiny_data_dir), "--cpu"]
        + ["--eval-samples", "3", "--batch-size", "2", "--max-new-tokens", "8"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["num_images"] == 3
    assert metrics["eval"]["adapter"] is None and metrics["eval"]["split"] == "test"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    speed = metrics["eval"]
    assert SPEED_KEYS <= set(speed) and speed["images"] == 3 and speed["batches"] == 2
    assert 0 < speed["decoded_tokens"] <= 3 * 8 and speed["decoding_steps"] <= 2 * 8
    assert speed["images_per_s"] > 0 and speed["decoded_tokens_per_s"] > 0
    f1 = metrics["intervals"]["f1"]
    assert f1["low"] <= f1["value"] <= f1["high"]
    assert "RR_PROGRESS" not in capsys.readouterr().out  # the command line is for people


def test_whole_split_by_default_with_progress_events(
    monkeypatch, tiny_model_dir, tiny_data_dir, test_records, tmp_path, capsys
):
    from src.contract.progress import parse_line

    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY_S", 0.0)
    _scripted(monkeypatch, lambda i: "none")
    metrics = evaluate_base(str(tiny_model_dir), str(tiny_data_dir), tmp_path, batch_size=3)
    assert metrics["num_images"] == len(test_records) == 8  # the whole split, not the first 32 or fewer
    events = [e for e in map(parse_line, capsys.readouterr().out.splitlines()) if e]
    assert [(e["event"], e["stage"], e["done"], e["total"]) for e in events] == [
        ("eval", "baseline", done, 8) for done in (0, 3, 6, 8)
    ]


def test_eval_samples_caps_the_split_and_bad_flags_exit_2(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    base = [str(tmp_path), "--base", str(tiny_model_dir), "--dataset", str(tiny_data_dir), "--cpu"]
    assert main([*base, "--eval-samples", "-1"]) == 2
    assert "--max-samples -1" in capsys.readouterr().err
    assert main([*base, "--batch-size", "0"]) == 2
    assert "--batch-size 0: use auto" in capsys.readouterr().err
    assert main([*base, "--max-samples", "2", "--max-new-tokens", "4", "--decode", "static"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 2


def test_batches_group_images_by_size_and_predictions_keep_record_order(monkeypatch, tiny_processor):
    from PIL import Image

    sizes = [(112, 112), (56, 56), (224, 168), (56, 56), (224, 168), (112, 112)]
    records = [DetectionRecord(Image.new("RGB", size), *size, [], f"img{i}") for i, size in enumerate(sizes)]
    batches = []

    def fake_generate(model, processor, images, device, prompt, max_new_tokens, **_):
        batches.append([image.size for image in images])
        return [f"{w}x{h}" for w, h in (image.size for image in images)]

    monkeypatch.setattr(predict_module, "generate_answers", fake_generate)
    processor = tiny_processor
    predictions = predict_records(None, processor, records, batch_size=2)
    assert batches == [[(224, 168)] * 2, [(112, 112)] * 2, [(56, 56)] * 2]  # largest first, one size each
    assert [p.text for p in predictions] == [f"{w}x{h}" for w, h in sizes]
    assert [p.image for p in predictions] == [f"img{i}" for i in range(len(sizes))]
    assert batching_order(processor, records[:2]) == [0, 1]


def test_generation_stops_when_every_answer_has_ended(tiny_eval_model, test_records):
    # The lm_head is pushed to <|im_end|> from the 2nd token on for the first image, the 4th for the
    # second: generate() must stop after 4 steps, not run to max_new_tokens.
    from PIL import Image

    model, processor, _ = tiny_eval_model
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    calls, ends_at = [0], [2, 4]

    def push_to_end(module, inputs, logits):
        calls[0] += 1
        for row, step in enumerate(ends_at):
            if calls[0] >= step:
                logits[row, -1, end_id] += 1e4
        return logits

    hook = model.lm_head.register_forward_hook(push_to_end)
    try:
        images = [Image.open(r.image).convert("RGB") for r in test_records[:2]]
        stats = GenerationStats()
        texts = predict_module.generate_answers(model, processor, images, max_new_tokens=12, stats=stats)
    finally:
        hook.remove()
    assert (stats.decoding_steps, stats.decoded_tokens, stats.images) == (4, 2 + 4, 2)
    assert all(text.endswith("<|im_end|>") for text in texts)


def test_answer_lengths_count_up_to_the_first_end_token():
    import torch

    end, pad = 9, 0
    new_tokens = torch.tensor([[5, 7, end, pad, pad], [5, 5, 5, 5, 5], [end, pad, pad, pad, pad]])
    assert answer_lengths(new_tokens, [end, pad]) == [3, 5, 1]


def test_eval_batch_is_sized_from_free_memory():
    from src.planning.memory import weight_bytes
    from src.planning.parameters import ModelShape
    from src.planning.shapes import SHAPES, VISION

    shape = ModelShape.from_config({**SHAPES["7b"], "vision_config": VISION, "model_type": "qwen2_vl"})
    kv_per_token = 2 * 28 * 4 * 128 * 2  # layers x kv heads x head_dim, k and v, bf16
    assert eval_bytes_per_image(shape, 420, 65) - eval_bytes_per_image(shape, 420, 64) == kv_per_token
    per_image = eval_bytes_per_image(shape, 420, 64)
    assert eval_batch_size(10 * per_image, shape, 420, 64, headroom=1.0) == 10
    assert eval_batch_size(10 * per_image + weight_bytes(shape, False), shape, 420, 64, False, 1.0) == 10
    assert eval_batch_size(per_image // 2, shape, 420, 64) == 1  # never 0: one image is tried anyway
    assert eval_batch_size(10**15, shape, 420, 64, cap=256) == 256
    assert eval_batch_size(40 * 2**30, shape, 420, 64) > eval_batch_size(40 * 2**30, shape, 900, 256)


def test_cli_refuses_a_directory_without_a_finished_run(tiny_data_dir, tmp_path, capsys):
    assert main([str(tmp_path), "--dataset", str(tiny_data_dir), "--cpu"]) == 2
    assert "status.json" in capsys.readouterr().err
    (tmp_path / "status.json").write_text(json.dumps({"status": "failed", "output": None}))
    assert main([str(tmp_path), "--dataset", str(tiny_data_dir), "--cpu"]) == 2
    assert "'failed'" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()
    assert main([str(tmp_path), str(tmp_path), "--base", "m", "--cpu"]) == 2  # --base writes one dir


def test_cli_evaluates_every_directory_and_reports_the_worst(
    monkeypatch, tiny_model_dir, tiny_data_dir, tmp_path
):
    good, bad = tmp_path / "good", tmp_path / "bad"

    def final_model_of(output_dir):  # good stands for a finished run whose model is the tiny base
        if Path(output_dir) == good:
            return tiny_model_dir
        raise EvaluationError(f"{output_dir}: no finished run there")

    monkeypatch.setattr(evaluate_module, "final_model_of", final_model_of)
    code = main(
        [str(bad), str(good), "--dataset", str(tiny_data_dir), "--cpu", "--max-samples", "2"]
        + ["--max-new-tokens", "4"]
    )
    assert code == 2
    assert json.loads((good / "metrics.json").read_text())["num_images"] == 2
    assert not (bad / "metrics.json").exists()


def test_final_model_and_adapter_base_are_found_from_another_working_directory(tmp_path):
    # A worker started in another directory wrote paths relative to it.
    run = tmp_path / "r3"
    adapter, merged = run / "stage2-llm" / "adapter", run / "stage1-vision" / "merged"
    adapter.mkdir(parents=True)
    merged.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "elsewhere/r3/stage1-vision/merged"})
    )
    (run / "status.json").write_text(
        json.dumps({"status": "succeeded", "output": "elsewhere/r3/stage2-llm/adapter"})
    )
    assert final_model_of(run) == adapter
    assert resolve_model(adapter, run) == (str(merged), str(adapter))
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct") == ("Qwen/Qwen2-VL-2B-Instruct", None)
    (run / "status.json").write_text(json.dumps({"status": "succeeded", "output": "nowhere/adapter2"}))
    with pytest.raises(EvaluationError, match="not there"):
        final_model_of(run)


@pytest.mark.slow
def test_evaluate_output_of_a_real_r3_run(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    # The worker runs in tmp_path with a relative --output-dir, as the launcher might.
    command = [sys.executable, str(REPO / "scripts" / "train_recipe.py"), "--recipe", "r3", "--cpu"]
    command += ["--model-id", str(tiny_model_dir), "--dataset", str(tiny_data_dir), "--output-dir", "runs/r3"]
    command += ["--max-steps", "2", "--batch-size", "2", "--no-wandb"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "r3"
    loaded = []
    original = evaluate_module.load_for_eval
    monkeypatch.setattr(
        evaluate_module, "load_for_eval", lambda *a, **k: loaded.append(a) or original(*a, **k)
    )
    metrics = evaluate_output(run, str(tiny_data_dir), max_samples=3, batch_size=2, max_new_tokens=16)
    assert loaded[0][0] == run / "stage2-llm" / "adapter"
    assert metrics["eval"]["base_model"] == str(run / "stage1-vision" / "merged")
    assert METRIC_KEYS | {"class_agnostic", "eval", "per_label", "num_images"} <= set(metrics)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["num_images"] == 3 and on_disk["eval"]["num_samples"] == 3
    lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(set(line) == PREDICTION_KEYS for line in lines)
