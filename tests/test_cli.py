"""The command line end to end: ``python -m ipo_lightning fit`` on a tiny saved model, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipo_lightning.cli import main
from ipo_lightning.metrics import metric_names
from tests.helpers import REPO, fit_config, polite_pairs, run_cli, run_main, write_config, write_jsonl


def _config(tmp_path: Path, model_dir: Path, train: Path, **data_overrides: object) -> Path:
    """Six steps of IPO with two named val sets and two test sets, validating every 3 steps."""
    val_a = write_jsonl(tmp_path / "val_a.jsonl", polite_pairs(6, offset=100))
    val_b = write_jsonl(tmp_path / "val_b.jsonl", polite_pairs(4, offset=200))
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        {"in_dist": val_a, "ood": val_b},
        trainer={"max_steps": 6, "val_check_interval": 3},
        model={
            "loss_type": "ipo",
            "beta": 0.5,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        },
        data={
            "test": {"held_out": {"path": str(val_a)}, "shifted": {"path": str(val_b)}},
            "batch_size": 4,
            **data_overrides,
        },
        divergence={"sample_prompts": 2, "max_new_tokens": 8},
    )
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.slow
def test_fit_writes_metrics_config_wandb_checkpoint_and_export(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(24))
    config = _config(tmp_path, tiny_model_dir, train)
    result = run_cli(tmp_path, "fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "version_0"

    # metrics.csv carries every contract name for train, the primary val set and each named set.
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for name in metric_names("ipo"):
        assert f"train/{name}" in columns
        assert f"val/{name}" in columns
        assert f"val/in_dist/{name}" in columns
        assert f"val/ood/{name}" in columns
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(train_losses) == 6 and all(loss >= 0 for loss in train_losses)
    # The divergence monitor is on by default: step 0 (policy = reference) and after each validation.
    divergence = [(int(r["step"]), float(r["divergence/kl"])) for r in rows if r.get("divergence/kl")]
    assert [step for step, _ in divergence] == [0, 3, 6]
    assert divergence[0][1] == 0.0 and divergence[-1][1] > 0.0
    assert all(r.get("divergence/seq_kl") for r in rows if r.get("divergence/kl"))
    # The primary set's plain names repeat its named values.
    last_val = [r for r in rows if r.get("val/loss")][-1]
    assert last_val["val/loss"] == last_val["val/in_dist/loss"]

    # The resolved config states the length normalisation explicitly.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["length_normalize"] is True
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())  # plain YAML, module + data
    assert hparams["length_normalize"] is True and hparams["max_length"] == 64
    assert hparams["val"]["ood"]["path"].endswith("val_b.jsonl")

    # The W&B run (offline) carries the full resolved CLI config, trainer options included.
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"accumulate_grad_batches" in wandb_file.read_bytes()
    # The divergence samples: a JSONL file beside metrics.csv and a W&B table.
    assert len((run_dir / "divergence_samples.jsonl").read_text().splitlines()) == 3 * 2  # 3 measurements
    assert list(wandb_file.parent.glob("files/media/table/divergence/samples_*.table.json"))

    # The export loads with the Auto classes and generates.
    export = run_dir / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer("Human: tell me about the sea. Assistant:", return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    info = json.loads((export / "ipo_lightning.json").read_text())
    assert info["loss_type"] == "ipo" and info["length_normalize"] is True and info["global_step"] == 6
    # ...and holds the trained weights, not the starting ones.
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(start.lm_head.weight, model.lm_head.weight)

    # `test` from the last checkpoint scores every named test set into a new run folder.
    (checkpoint,) = (run_dir / "checkpoints").glob("*.ckpt")  # saved at step 6, after the last validation
    main(["test", "--config", str(config), "--ckpt_path", str(checkpoint), "--wandb.enabled", "false"])
    with (tmp_path / "runs" / "version_1" / "metrics.csv").open() as handle:
        test_rows = list(csv.DictReader(handle))
    assert {"test/loss", "test/held_out/loss", "test/shifted/rewards/accuracy"} <= set(test_rows[0])
    # The primary test set is the in_dist val file: same checkpoint, same data, same loss.
    assert float(test_rows[-1]["test/held_out/loss"]) == pytest.approx(
        float(last_val["val/in_dist/loss"]), rel=1e-5
    )


def test_bad_data_exits_with_one_line_and_no_traceback(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in polite_pairs(5)]
    lines[3] = '{"prompt": "hi", "chosen": "ok",'  # truncated record on line 4
    train.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, tiny_model_dir, train)
    code, err = run_main(["fit", "--config", str(config)], capsys)  # the CLI's entry point, in this process
    assert code == 2
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "train.jsonl:4" in error_lines[0]
    # Nothing was written: not even an empty run folder.
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("records", "overrides", "expected"),
    [
        ([{"prompt": "hi", "chosen": " ok"}], {}, ["train.jsonl", "record 0", "rejected"]),
        ([{"prompt": "hi", "chosen": " ", "rejected": " no"}], {}, ["train.jsonl", "record 0", "chosen"]),
        (
            [{"prompt": "word " * 80, "chosen": " ok", "rejected": " no"}],
            {"max_prompt_length": None},
            ["train.jsonl", "record 0", "prompt", "max_length"],
        ),
    ],
    ids=["missing-field", "empty-completion", "prompt-too-long"],
)
def test_bad_records_name_file_record_and_field(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], records, overrides, expected
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(3) + records)
    # The bad record comes after three good ones.
    expected = [part.replace("record 0", "record 3") for part in expected]
    config = _config(tmp_path, tiny_model_dir, train, **overrides)
    code, err = run_main(["fit", "--config", str(config), "--trainer.logger", "false"], capsys)
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1
    for part in expected:
        assert part in message[0], message[0]


USER = {"role": "user", "content": "tell me about the sea"}
REPLY = {"role": "assistant", "content": "the sea is lovely"}
RUDE = {"role": "assistant", "content": "go away"}
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.mark.parametrize(
    "problem", ["not-utf8", "template-raises", "completion-role", "prompt-ends-with-assistant"]
)
def test_bad_data_bytes_and_turns_name_file_line_and_field(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    """Record 3 (line 4) of train.jsonl is bad; the CLI says where in one line and exits with 2."""
    records = [{"prompt": [USER], "chosen": [REPLY], "rejected": [RUDE]} for _ in range(6)]
    model_dir = tiny_model_dir
    if problem == "template-raises":
        records[3]["prompt"] = [USER, USER]
        model_dir = tmp_path / "model"
        shutil.copytree(tiny_model_dir, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = ALTERNATING_TEMPLATE
        tokenizer.save_pretrained(model_dir)
    if problem == "completion-role":
        records[3]["chosen"] = [REPLY, USER]
    if problem == "prompt-ends-with-assistant":
        records[3]["prompt"] = [USER, REPLY]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    bad_at = None
    if problem == "not-utf8":
        data = train.read_bytes()
        start = data.index(b"\n", data.index(b"\n", data.index(b"\n") + 1) + 1) + 1  # line 4
        bad_at = data.index(b"lovely", start) + 3
        train.write_bytes(data[:bad_at] + b"\xe9" + data[bad_at + 1 :])
    config = _config(tmp_path, model_dir, train)
    code, err = run_main(["fit", "--config", str(config), "--trainer.logger", "false"], capsys)
    assert code == 2 and "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1, err[-2000:]
    record = f"error: {train}:4: record 3: "
    expected = {
        "not-utf8": f"error: {train}:4: not valid UTF-8 (byte offset {bad_at}, byte 0xe9",
        "template-raises": record + "field 'prompt': the chat template fails on the prompt: TemplateError: "
        "Conversation roles must alternate",
        "completion-role": record + "field 'chosen', message 1: role 'user' in a completion",
        "prompt-ends-with-assistant": record + "field 'prompt', message 1: the prompt ends with an assistant",
    }[problem]
    assert message[0].startswith(expected), message[0]


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every shipped config is valid (keys, types, class paths) without loading models or data."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (
        printed["model"]["model_name_or_path"]
        == yaml.safe_load(config.read_text())["model"]["model_name_or_path"]
    )


def test_fit_without_training_data_names_the_option(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(3))
    config = _config(tmp_path, tiny_model_dir, train)
    code, err = run_main(
        ["fit", "--config", str(config), "--data.train", "null", "--trainer.logger", "false"], capsys
    )
    assert code == 2
    assert "error: fit needs training data: set data.train.path" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model.loss_type", "dpo", "--model.label_smoothing", "0.7"],
            "label_smoothing must be in [0, 0.5)",
        ),
        (["--model.logprob_chunk_size", "0"], "model.logprob_chunk_size must be positive"),
        (
            ["--model.model_name_or_path", "/nonexistent/model"],
            "cannot load model '/nonexistent/model': no such folder",
        ),
        (["--data.max_length", "4096"], "data.max_length=4096 exceeds the model's context size"),
        (["--data.train.limit", "0"], "limit must be a positive number"),
        (["--model.loss_type", "hinge", "--data.train.path", "{soft}"], "soft labels (preference_prob < 1)"),
        (["--data.train.path", "{same}"], "identical"),
        (
            ["--model.batching", "prefix_shared", "--model.attn_implementation", "flash_attention_2"],
            "model.batching=prefix_shared needs a 4D attention mask",
        ),
    ],
    ids=[
        "label-smoothing",
        "chunk-size",
        "model-path",
        "context",
        "limit",
        "soft-labels-hinge",
        "identical-pairs",
        "batching",
    ],
)
def test_bad_settings_fail_at_start_with_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    soft = write_jsonl(tmp_path / "soft.jsonl", [dict(r, preference_prob=0.7) for r in polite_pairs(4)])
    config = _config(tmp_path, tiny_model_dir, train)
    same = write_jsonl(tmp_path / "same.jsonl", [dict(r, rejected=r["chosen"]) for r in polite_pairs(4)])
    args = [arg.replace("{soft}", str(soft)).replace("{same}", str(same)) for arg in args]
    code, err = run_main(["fit", "--config", str(config), *args], capsys)
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and expected in message[0], err[-2000:]
    assert "Traceback" not in err
    # Nothing that looks like a run, not even an empty run folder. (The soft-label and identical-pairs
    # checks need the tokenised data, so they run after Lightning has opened the loggers' run folder.)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_unknown_config_key_is_rejected(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(3))
    config = _config(tmp_path, tiny_model_dir, train)
    code, err = run_main(["fit", "--config", str(config), "--model.betta", "0.2"], capsys)
    assert code == 2
    assert "betta" in err and "Traceback" not in err


def test_fit_imports_no_subcommand_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fit`` runs where the reports' packages are missing (a GPU machine without matplotlib)."""
    import sys

    from ipo_lightning import entry

    for name in [m for m in sys.modules if m.startswith(("ipo_lightning.analysis", "matplotlib"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert entry._tool("fit") is None and entry._tool(None) is None
    assert not [m for m in sys.modules if m.startswith("ipo_lightning.analysis")]
    with pytest.raises(ImportError, match="matplotlib"):
        entry._tool("report")  # the one that draws plots needs it


@pytest.mark.slow
def test_each_fit_in_one_process_ends_its_own_wandb_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Lightning's WandbLogger adopts a W&B run in progress: a second fit in the same process (a
    # notebook, a sweep script) would log into the first fit's run unless each fit ends its own.
    import wandb

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    records = []
    for name in ("first", "second"):
        config = fit_config(
            tmp_path / name,
            tiny_model_dir,
            train,
            trainer={"max_steps": 1},
            divergence={"enabled": False},
            export={"enabled": False},
        )
        main(["fit", "--config", str(write_config(tmp_path / f"{name}.yaml", config))])
        assert wandb.run is None  # ended with the fit
        (record,) = (tmp_path / name / "runs" / "version_0" / "wandb").glob("offline-run-*/run-*.wandb")
        records.append(record)
    assert records[0].stem != records[1].stem  # two runs, each in its own run folder
