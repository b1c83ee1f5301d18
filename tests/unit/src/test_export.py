"""`python -m src.export`: a launch's recipe as a standalone model that gives the answers its adapter gave.

Fast tests build launch directories by hand (summary.json, metrics.json, report.json) and check which
job is chosen and every refusal (exit 2, nothing written). The slow ones run the real worker on the tiny
fixtures (r4: bf16 LoRA; r1: QLoRA, whose adapter goes into the unquantized base), export, reload the
folder with transformers alone and compare its greedy answers and logits with the adapter loaded the way
evaluation loads it (src.eval.predict.load_for_eval).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_runner.results.report import build_report
from recipe_runner.results.summary import JobResult, write_summary
from src.export import PROVENANCE_FILE, ExportError, choose_job, main, read_launch
from tests.conftest import REPO, worker_argv

# r3 (an adapter on stage 1's merged model) is left out to keep this under a minute on 2 cores; its
# adapter's base is found as evaluation finds it (resolve_model, tested in test_predict_eval.py).
WORKER_RECIPES = {"r4": "r4-joint", "r1": "r1-llm-only"}
# The export's weights are bf16, evaluation's on the CPU fp32: first-token logits of the tiny model differ
# by ~0.003 through that rounding, and by ~0.5 between the trained model and its base.
LOGIT_ATOL = 0.02


def _job(launch: Path, name: str, recipe: str, status: str) -> JobResult:
    out = launch / name
    return JobResult(
        recipe=recipe,
        name=name,
        device="cpu",
        gpu_uuids=[],
        status=status,
        exit_code=0 if status == "succeeded" else 1,
        duration_s=1.0,
        final_loss=1.0,
        output=str(out / "adapter"),
        output_dir=str(out),
        log=str(launch / "logs" / f"{name}.log"),
    )


def fake_launch(launch: Path, jobs: list[tuple[str, str, str, float | None]]) -> Path:
    """A launch directory with summary.json and, per (name, recipe, status, f1), a metrics.json."""
    results = []
    for name, recipe, status, f1 in jobs:
        (launch / name).mkdir(parents=True)
        if f1 is not None:
            (launch / name / "metrics.json").write_text(json.dumps({"f1": f1, "precision": f1, "recall": f1}))
        results.append(_job(launch, name, recipe, status))
    write_summary(launch, launch.name, results, 0, ["recipe-run"])
    return launch


def _chosen(launch: Path, wanted: str) -> str:
    job, _ = choose_job(launch, read_launch(launch), wanted)
    return job["name"]


def test_best_is_the_reports_winner_by_f1(tmp_path):
    launch = fake_launch(
        tmp_path / "launch",
        [
            ("r1-llm-only", "r1-llm-only", "succeeded", 0.3),
            ("r2-vision-only", "r2-vision-only", "failed", 0.9),  # failed: never the winner
            ("r3-two-stage", "r3-two-stage", "succeeded", 0.5),
            ("r4-joint", "r4-joint", "succeeded", 0.5),  # a tie goes to the first in launch order
        ],
    )
    assert _chosen(launch, "best") == "r3-two-stage"
    assert build_report(launch)["best"]["f1"] == "r3-two-stage"  # the same rule as the report's
    (launch / "report.json").write_text(json.dumps({"best": {"f1": "r1-llm-only"}}))
    job, chosen_by = choose_job(launch, read_launch(launch), "best")
    assert job["name"] == "r1-llm-only" and "report.json" in chosen_by  # the report, once written, decides
    (launch / "report.json").write_text(json.dumps({"best": {"f1": "r9-gone"}}))
    with pytest.raises(ExportError, match="report.json's winner; rewrite it: recipe-run report"):
        _chosen(launch, "best")


def test_recipe_by_job_name_or_alias_and_ambiguous_sweeps(tmp_path):
    launch = fake_launch(
        tmp_path / "launch",
        [
            ("r4-joint-seed0", "r4-joint", "succeeded", 0.2),
            ("r4-joint-seed1", "r4-joint", "succeeded", 0.4),
            ("r1-llm-only", "r1-llm-only", "succeeded", 0.1),
        ],
    )
    assert _chosen(launch, "r1") == _chosen(launch, "r1-llm-only") == "r1-llm-only"
    assert _chosen(launch, "r4-joint-seed1") == _chosen(launch, "best") == "r4-joint-seed1"
    with pytest.raises(ExportError, match="matches several jobs"):
        _chosen(launch, "r4")


def _refused(capsys, out: Path, *argv: str) -> str:
    """main(argv) exits 2, writes nothing at --out nor beside it, and says why on stderr."""
    before = sorted(out.parent.iterdir()) if out.parent.exists() else []
    assert main([*argv, "--out", str(out)]) == 2
    after = sorted(out.parent.iterdir()) if out.parent.exists() else []
    assert after == before  # no model, no half-written temporary folder
    return capsys.readouterr().err


def test_bad_input_exits_2_naming_the_flag_and_writes_nothing(tmp_path, capsys):
    launch = fake_launch(
        tmp_path / "launch",
        [("r4-joint", "r4-joint", "succeeded", None), ("r1-llm-only", "r1-llm-only", "oom", None)],
    )
    out = tmp_path / "exports" / "model"
    out.parent.mkdir()
    error = _refused(capsys, out, str(tmp_path / "empty"))
    assert "LAUNCH_DIR" in error and "summary.json" in error
    error = _refused(capsys, out, str(launch), "--recipe", "r9")
    assert "--recipe r9" in error and "r4-joint, r1-llm-only" in error
    error = _refused(capsys, out, str(launch), "--recipe", "r1")
    assert "'oom'" in error and "recipe-run resume" in error
    error = _refused(capsys, out, str(launch))  # best, but nothing was evaluated
    assert "--recipe best" in error and "--recipe NAME" in error
    error = _refused(capsys, out, str(launch), "--recipe", "r4")  # no status.json: no finished run there
    assert "--recipe" in error and "status.json" in error
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error = _refused(capsys, out, str(launch), "--recipe", "r4")
    assert "--out" in error and "not an empty directory" in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- the real worker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_launch(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A launch of r4 and r1 (2 steps each, run side by side), r4 the winner by its metrics.json."""
    launch = tmp_path_factory.mktemp("launch")
    (launch / "logs").mkdir()
    workers = {}
    for alias, name in WORKER_RECIPES.items():
        argv = worker_argv(alias, tiny_model_dir, tiny_data_dir, launch / name, "--cpu", "--skip-eval")
        argv += ["--threads", "1", "--learning-rate", "1e-2"]  # a large step: the adapter changes answers
        with open(launch / "logs" / f"{name}.log", "w") as log:
            workers[name] = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    results = []
    for name, process in workers.items():
        process.wait(timeout=300)
        assert process.returncode == 0, (launch / "logs" / f"{name}.log").read_text()[-3000:]
        results.append(_job(launch, name, name, "succeeded"))
    for name, f1 in (("r4-joint", 0.6), ("r1-llm-only", 0.4)):
        (launch / name / "metrics.json").write_text(json.dumps({"f1": f1}))
    write_summary(launch, launch.name, results, 0, ["recipe-run"])
    return launch


@pytest.fixture(scope="module")
def test_records(tiny_data_dir):
    from src.data.dataset import load_records

    return load_records(str(tiny_data_dir), "test")[0][:3]


def _first_token_logits(model, processor, records):
    """The next-token logits after the prompt, for each record's image (fp32)."""
    import torch
    from PIL import Image

    from src.data.dataset import DEFAULT_PROMPT

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [Image.open(r.image).convert("RGB") for r in records]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits[:, -1].float()


def assert_answers_like_the_adapter(exported: Path, adapter: Path, base_model: Path, records) -> None:
    """The exported folder, loaded with transformers alone, answers as the adapter does in evaluation."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from src.eval.predict import load_for_eval, predict_records

    assert not (exported / "adapter_config.json").exists()  # nothing for PEFT: a plain model folder
    assert (exported / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (exported / "processor_config.json").read_text()
    )
    config = json.loads((exported / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    as_saved = AutoModelForImageTextToText.from_pretrained(exported)
    processor = AutoProcessor.from_pretrained(exported)
    assert as_saved.dtype == torch.bfloat16
    assert not any("lora" in key for key in as_saved.state_dict())

    reference, reference_processor, family = load_for_eval(adapter, "cpu")  # fp32, adapter merged
    untrained = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32)
    for who in (processor, reference_processor):
        who.tokenizer.padding_side = "left"
    expected = _first_token_logits(reference, reference_processor, records)
    got = _first_token_logits(as_saved, processor, records)
    assert torch.allclose(got, expected, atol=LOGIT_ATOL, rtol=0), (got - expected).abs().max()
    moved = (_first_token_logits(untrained, reference_processor, records) - expected).abs().max()
    assert moved > 10 * LOGIT_ATOL  # the adapter changed the model: an unmerged export would fail above

    exported_fp32 = AutoModelForImageTextToText.from_pretrained(exported, dtype=torch.float32)
    options = {"family": family, "device": "cpu", "batch_size": 3, "max_new_tokens": 16}
    answers = [p.text for p in predict_records(exported_fp32, processor, records, **options)]
    expected_answers = [p.text for p in predict_records(reference, reference_processor, records, **options)]
    base_answers = [p.text for p in predict_records(untrained, reference_processor, records, **options)]
    assert answers == expected_answers
    assert base_answers != expected_answers


@pytest.mark.slow
def test_best_exports_the_winner_and_it_answers_like_its_adapter(
    trained_launch, tiny_model_dir, test_records, tmp_path
):
    out = tmp_path / "winner"
    assert main([str(trained_launch), "--out", str(out)]) == 0
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["job"] == "r4-joint" and provenance["f1"] == 0.6
    assert "best" in provenance["chosen_by"] and provenance["dtype"] == "bfloat16"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".winner")]  # no temporary left
    adapter = trained_launch / "r4-joint" / "adapter"
    assert_answers_like_the_adapter(out, adapter, tiny_model_dir, test_records)


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_unquantized_base(
    trained_launch, tiny_model_dir, test_records, tmp_path
):
    out = tmp_path / "r1"
    out.mkdir()  # an empty --out is fine
    assert main([str(trained_launch), "--recipe", "r1", "--out", str(out)]) == 0
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["job"] == "r1-llm-only" and provenance["base_model"] == str(tiny_model_dir)
    adapter = trained_launch / "r1-llm-only" / "adapter"
    assert_answers_like_the_adapter(out, adapter, tiny_model_dir, test_records)


def test_help_explains_without_loading_torch():
    script = (
        "import sys; from src.export import build_parser as b; "
        "print(b().format_help(), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert (
        "--recipe NAME|best" in done.stdout
        and "from_pretrained" in done.stdout
        and "--out DIR" in done.stdout
    )
    assert done.stdout.rstrip().endswith("False")  # torch loads only when there is something to export
