"""The Bradley-Terry reward model (``method: reward_model``): loss, metrics, training, export, CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    RobertaConfig,
)

from ipo_lightning.cli import PreferenceCLI, main
from ipo_lightning.data import PreferenceDataModule
from ipo_lightning.data.sources import DataSource
from ipo_lightning.errors import ConfigError, DataError
from ipo_lightning.gold.pairs import bayes_accuracy
from ipo_lightning.methods import METHODS, method_from_argv
from ipo_lightning.modeling import check_context_size, config_position_offset
from ipo_lightning.resume import RNGStateCheckpoint, find_resume_checkpoint
from ipo_lightning.reward_model import RewardMetrics, RewardModelModule, reward_model_loss
from ipo_lightning.rewards import load_reward
from tests.helpers import (
    fit_config,
    polite_pairs,
    run_clis,
    run_main,
    save_tiny_reward_model,
    write_config,
    write_jsonl,
)
from tests.ranks import Torchrun


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_loss_matches_the_bradley_terry_formula() -> None:
    chosen = torch.tensor([1.5, -0.3, 0.2, 2.0], dtype=torch.float64)
    rejected = torch.tensor([0.5, 0.4, 0.2, -1.0], dtype=torch.float64)
    pairs = list(zip(chosen.tolist(), rejected.tolist(), strict=True))

    hard = reward_model_loss(chosen, rejected)
    assert hard.tolist() == pytest.approx([-_log_sigmoid(win - lose) for win, lose in pairs], rel=1e-12)

    prob = torch.tensor([1.0, 0.7, 0.5, 0.9], dtype=torch.float64)
    soft = reward_model_loss(chosen, rejected, preference_prob=prob)
    expected = [
        -p * _log_sigmoid(win - lose) - (1 - p) * _log_sigmoid(lose - win)
        for (win, lose), p in zip(pairs, prob.tolist(), strict=True)
    ]
    assert soft.tolist() == pytest.approx(expected, rel=1e-12)

    # Label smoothing e on a hard label: the target probability is 1 - e.
    smoothed = reward_model_loss(chosen, rejected, label_smoothing=0.1)
    assert smoothed.tolist() == pytest.approx(
        [-0.9 * _log_sigmoid(win - lose) - 0.1 * _log_sigmoid(lose - win) for win, lose in pairs], rel=1e-12
    )

    # Centring, as TRL's RewardTrainer: the batch loss gains c * mean((r_w + r_l)^2).
    centred = reward_model_loss(chosen, rejected, center_rewards_coefficient=0.01)
    trl_batch_loss = statistics.fmean(
        -_log_sigmoid(win - lose) for win, lose in pairs
    ) + 0.01 * statistics.fmean((win + lose) ** 2 for win, lose in pairs)
    assert centred.mean().item() == pytest.approx(trl_batch_loss, rel=1e-12)


def test_bad_lora_options_are_config_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.lora.rank must be at least 1, got 0"):
        RewardModelModule(str(tiny_model_dir), lora={"rank": 0})


def test_bad_loss_options_are_config_errors() -> None:
    scores = torch.zeros(2)
    with pytest.raises(ConfigError, match=r"model.label_smoothing must be in \[0, 0.5\), got 0.5"):
        reward_model_loss(scores, scores, label_smoothing=0.5)
    with pytest.raises(ConfigError, match="model.center_rewards_coefficient must be >= 0"):
        reward_model_loss(scores, scores, center_rewards_coefficient=-1.0)


def test_metrics_match_an_independent_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, generator=generator), torch.randn(3, generator=generator)) for _ in range(2)]
    metrics = RewardMetrics()
    for chosen, rejected in batches:
        metrics.update(chosen, rejected, reward_model_loss(chosen, rejected))
    values = {name: value.item() for name, value in metrics.compute().items()}

    pairs = [
        (win, lose)
        for chosen, rejected in batches
        for win, lose in zip(chosen.tolist(), rejected.tolist(), strict=True)
    ]
    scores = [score for chosen, rejected in batches for score in chosen.tolist() + rejected.tolist()]
    assert values["rm/accuracy"] == pytest.approx(statistics.fmean(float(win > lose) for win, lose in pairs))
    assert values["rm/margin"] == pytest.approx(statistics.fmean(win - lose for win, lose in pairs), abs=1e-6)
    assert values["rm/reward_mean"] == pytest.approx(statistics.fmean(scores), abs=1e-6)
    assert values["rm/reward_std"] == pytest.approx(statistics.pstdev(scores), rel=1e-5)
    assert values["loss"] == pytest.approx(
        statistics.fmean(-_log_sigmoid(win - lose) for win, lose in pairs), rel=1e-5
    )
    metrics.reset()
    assert metrics.update_count == 0


def test_bayes_accuracy_is_the_mean_agreement_probability(tmp_path: Path) -> None:
    records = [
        dict(record, flip_prob=flip)
        for record, flip in zip(polite_pairs(4), [0.0, 0.1, 0.25, 0.5], strict=True)
    ]
    assert bayes_accuracy(write_jsonl(tmp_path / "set.jsonl", records)) == pytest.approx(
        (1.0 + 0.9 + 0.75 + 0.5) / 4
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [records[0], {"prompt": "x"}])
    with pytest.raises(DataError, match=rf"{bad}, line 2: field 'flip_prob': expected a number in \[0, 1\]"):
        bayes_accuracy(bad)


def test_method_is_selected_by_option_or_config_and_the_last_one_wins(tmp_path: Path) -> None:
    config = write_config(tmp_path / "rm.yaml", {"method": "reward_model"})
    assert method_from_argv(["fit", "--method", "reward_model"]) == "reward_model"
    assert method_from_argv(["fit", "--method=reward_model"]) == "reward_model"
    assert method_from_argv(["fit", "--config", str(config)]) == "reward_model"
    assert method_from_argv(["fit", "--config", str(config), "--method", "preference"]) == "preference"
    assert method_from_argv(["fit", "--method", "preference", f"--config={config}"]) == "reward_model"
    assert METHODS["reward_model"].module_class is RewardModelModule
    assert METHODS["reward_model"].datamodule_class is PreferenceDataModule


def _rm_config(tmp_path: Path, model_dir: Path, **sections: object) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(48))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(12, offset=100))
    noisy = write_jsonl(tmp_path / "noisy.jsonl", polite_pairs(8, offset=200))
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        {"in_dist": val, "noisy": noisy},
        method="reward_model",
        trainer={"max_epochs": 3, "val_check_interval": 1.0, "enable_checkpointing": False},
        model={"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}},
        data={"batch_size": 8},
        wandb={"enabled": False},
    )
    for name, value in sections.items():
        config[name] = value
    return config


def test_help_shows_the_reward_models_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--method", "reward_model", "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--model.center_rewards_coefficient" in out and "--model.loss_type" not in out
    assert "--model.lora LORA" in out
    assert "reward_model: a Bradley-Terry reward model" in out


def test_pre_read_and_parsed_method_must_agree(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    args = ["--model.model_name_or_path", str(tiny_model_dir), "--data.train.path", str(train)]
    with pytest.raises(
        ConfigError, match="the command line selects 'preference'.*parsed config says 'reward_model'"
    ):
        PreferenceCLI(args=[*args, "--method", "reward_model"], run=False, method="preference")


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("generation", {"reward": "builtin:gold"}, "generation.reward: the generation evaluation samples"),
        ("kl_budget", {"max_kl": 1.0}, "kl_budget.max_kl: method reward_model has no policy"),
    ],
)
def test_policy_only_callbacks_are_refused(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    value: dict,
    expected: str,
) -> None:
    config = write_config(tmp_path / "rm.yaml", _rm_config(tmp_path, tiny_model_dir, **{section: value}))
    code, err = run_main(["fit", "--config", str(config)], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err[-2000:]


def test_cli_fit_trains_a_separable_set_and_exports_a_loadable_reward_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "rm.yaml", _rm_config(tmp_path, tiny_model_dir))
    cli = PreferenceCLI(args=["fit", "--config", str(config)])
    run_dir = tmp_path / "runs" / "version_0"

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"] == "reward_model" and saved["divergence"]["enabled"] is False
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert not any(name.startswith(("divergence/", "gen/")) for name in rows[0])
    val_rows = [row for row in rows if row.get("val/rm/accuracy")]
    assert len(val_rows) == 3
    last = val_rows[-1]
    # Chosen always says "is lovely", rejected never: held-out pairs are told apart.
    assert float(last["val/rm/accuracy"]) == 1.0 == float(last["val/in_dist/rm/accuracy"])
    assert float(last["val/noisy/rm/accuracy"]) == 1.0
    assert float(last["val/rm/margin"]) > 1.0
    assert {f"train/rm/{name}" for name in ("accuracy", "margin", "reward_mean", "reward_std")} <= set(
        rows[0]
    )

    # The module's own scores of the in_dist set, recomputed into the logged metrics.
    module: RewardModelModule = cli.model
    module.eval()
    datamodule = cli.datamodule
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader()[0]:
            scores = module.score_rows(batch)
            chosen += scores[: len(scores) // 2].tolist()
            rejected += scores[len(scores) // 2 :].tolist()
    assert float(last["val/in_dist/rm/margin"]) == pytest.approx(
        statistics.fmean(win - lose for win, lose in zip(chosen, rejected, strict=True)), rel=1e-4
    )
    assert float(last["val/in_dist/rm/reward_std"]) == pytest.approx(
        statistics.pstdev(chosen + rejected), rel=1e-4
    )

    # The export: a sequence classifier that transformers and load_reward load, scoring like the module.
    export = run_dir / "hf_model"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    records = polite_pairs(12, offset=100)
    texts = [record["prompt"] + record["chosen"] for record in records]
    with torch.no_grad():
        padded = tokenizer(texts, return_tensors="pt", padding=True)
        transformers_scores = model(**padded).logits[:, 0].tolist()
    assert transformers_scores == pytest.approx(chosen, abs=1e-4)
    reward = load_reward(str(export), option="--generation.reward")
    scores = reward([r["prompt"] for r in records], [r["chosen"] for r in records])
    assert scores == pytest.approx(chosen, abs=1e-4)
    info = json.loads((export / "ipo_lightning.json").read_text())
    assert info["method"] == "reward_model" and info["loss"] == "bradley_terry" and info["global_step"] == 18
    card = (export / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "Bradley-Terry" in card
    assert "| `val/rm/accuracy` | 1 |" in card and "AutoModelForSequenceClassification" in card


class _StopAtStep(Callback):
    """End fit cleanly after optimizer step ``step`` (its checkpoint is saved at that batch's end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit_reward_model(
    model_dir: Path, train: Path, root: Path, *, stop_at: int | None, ckpt_path: Path | None
):
    L.seed_everything(0)
    module = RewardModelModule(
        str(model_dir),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        attn_implementation="eager",  # dropout inside attention, on the torch generator
        disable_dropout=False,  # the dropout makes the random state matter
    )
    data = PreferenceDataModule(
        train=DataSource(path=str(train)),
        tokenizer_name_or_path=str(model_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=4,
    )
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True, save_top_k=0),
        RNGStateCheckpoint(),
    ]
    if stop_at is not None:
        callbacks.append(_StopAtStep(stop_at))
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


def test_resume_is_bitwise_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "dropout_model"))
    config = AutoConfig.from_pretrained(model_dir)
    config.attention_dropout = 0.3
    config.save_pretrained(model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(12))  # 3 steps per epoch, 6 in all
    _, straight = _fit_reward_model(model_dir, train, tmp_path / "straight", stop_at=None, ckpt_path=None)
    root = tmp_path / "stopped"
    stopped_trainer, _ = _fit_reward_model(model_dir, train, root, stop_at=4, ckpt_path=None)
    assert stopped_trainer.global_step == 4
    checkpoint = find_resume_checkpoint(root)
    assert checkpoint is not None
    resumed_trainer, resumed = _fit_reward_model(model_dir, train, root, stop_at=None, ckpt_path=checkpoint)
    assert resumed_trainer.global_step == 6
    for (name, expected), (_, actual) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name
    start = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    assert not torch.equal(straight.model.model.embed_tokens.weight, start.model.embed_tokens.weight)


@pytest.mark.slow
def test_ddp_fit_logs_synced_metrics_and_exports(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _rm_config(tmp_path, tiny_model_dir)
    config["trainer"].update({"devices": 2, "strategy": "ddp", "max_epochs": 2})
    run = Torchrun(["fit", "--config", str(write_config(tmp_path / "rm.yaml", config))])
    (result,) = run_clis(tmp_path, run)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / run.folder
    with (run_dir / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/rm/accuracy")]
    # 48 pairs, 16 per global batch (8 on each of 2 ranks): 3 optimizer steps per epoch, a validation
    # at each epoch's end, its row at the steps taken by then.
    assert [int(row["step"]) for row in rows] == [3, 6]
    assert float(rows[-1]["val/in_dist/rm/accuracy"]) == 1.0
    assert AutoModelForSequenceClassification.from_pretrained(run_dir / "hf_model").config.num_labels == 1


def test_training_scores_equal_the_exports_except_for_a_cut_prompt_and_a_merged_boundary(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Plain text: training scores the prompt's last ``max_prompt_length`` tokens followed by the
    completion tokenised on its own; the exported reward (``load_reward``) tokenises the text
    ``prompt + completion`` whole. The two agree on a prompt that fits and a boundary that splits no
    token, and differ, as the reward model's documentation says, for a prompt cut by
    ``max_prompt_length`` and for a token that merges across the boundary."""
    max_prompt_length = 14
    records = {
        "fits": {"prompt": "Human: hi. Assistant:", "chosen": " It is lovely.", "rejected": " No."},
        "cut": {
            "prompt": "Human: tell me about the sea and the quick brown fox. Assistant:",
            "chosen": " It is lovely.",
            "rejected": " No.",
        },
        "merged": {"prompt": "Human: hi. Assistant: the ", "chosen": "sea", "rejected": " No."},
    }
    datamodule = PreferenceDataModule(
        val={
            name: DataSource(str(write_jsonl(tmp_path / f"{name}.jsonl", [r]))) for name, r in records.items()
        },
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=48,
        max_prompt_length=max_prompt_length,
        batch_size=1,
    )
    datamodule.setup("validate")
    tokenizer = datamodule.tokenizer
    module = RewardModelModule(str(tiny_model_dir))
    module.configure_model()
    module.eval()
    export = tmp_path / "export"
    module.model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    reward = load_reward(str(export), option="--generation.reward")

    def score(ids: list[int]) -> float:
        with torch.no_grad():
            return float(module.model(input_ids=torch.tensor([ids])).logits[0, 0])

    for (name, record), loader in zip(records.items(), datamodule.val_dataloader(), strict=True):
        prompt, chosen = record["prompt"], record["chosen"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert (len(prompt_ids) > max_prompt_length) == (name == "cut")
        trained_ids = (
            prompt_ids[-max_prompt_length:] + tokenizer(chosen, add_special_tokens=False)["input_ids"]
        )
        exported_ids = tokenizer(prompt + chosen)["input_ids"]
        with torch.no_grad():
            trained = float(module.score_rows(next(iter(loader)))[0])
        exported = reward([prompt], [chosen])[0]
        assert trained == pytest.approx(score(trained_ids), abs=1e-4), name
        assert exported == pytest.approx(score(exported_ids), abs=1e-4), name
        if name == "fits":
            assert trained_ids == exported_ids and trained == pytest.approx(exported, abs=1e-4)
        else:
            assert trained_ids != exported_ids and abs(trained - exported) > 1e-4, name


@pytest.mark.slow
def test_lora_trains_adapters_and_the_score_head_and_exports_a_merged_classifier(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
    config = _rm_config(tmp_path, tiny_model_dir)
    config["model"] = {
        **config["model"],
        "lora": lora,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
    }
    config["trainer"]["max_epochs"] = 2
    cli = PreferenceCLI(args=["fit", "--config", str(write_config(tmp_path / "rm.yaml", config))])
    run_dir = tmp_path / "runs" / "version_0"
    module: RewardModelModule = cli.model
    module.eval()

    # Trained: the adapters and the head's full copy (modules_to_save); frozen: every base weight.
    trainable = {name for name, param in module.model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert any(".score.modules_to_save." in name for name in trainable)
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base = module.model.get_base_model()
    torch.testing.assert_close(
        base.model.embed_tokens.weight, start.model.embed_tokens.weight, rtol=0, atol=0
    )
    with open(run_dir / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/rm/accuracy")]
    assert float(rows[-1]["val/rm/accuracy"]) == 1.0 and float(rows[-1]["val/rm/margin"]) > 1.0

    # The export is a plain sequence classifier (merged, no peft names) scoring what the module scores.
    export = run_dir / "hf_model"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    from safetensors.torch import load_file

    keys = set(load_file(export / "model.safetensors"))
    assert "score.weight" in keys and not any("lora_" in key or "modules_to_save" in key for key in keys)
    head = base.score
    # The trained head, not the one it started from (peft keeps that as original_module).
    torch.testing.assert_close(model.score.weight, head.modules_to_save["default"].weight, rtol=0, atol=0)
    assert not torch.equal(model.score.weight, head.original_module.weight)
    records = polite_pairs(12, offset=100)
    chosen: list[float] = []
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader()[0]:
            scores = module.score_rows(batch)
            chosen += scores[: len(scores) // 2].tolist()
    tokenizer = AutoTokenizer.from_pretrained(export)
    texts = [record["prompt"] + record["chosen"] for record in records]
    with torch.no_grad():
        exported = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0].tolist()
    assert exported == pytest.approx(chosen, abs=1e-4)
    reward = load_reward(str(export), option="--generation.reward")
    assert reward([r["prompt"] for r in records], [r["chosen"] for r in records]) == pytest.approx(
        chosen, abs=1e-4
    )
    info = json.loads((export / "ipo_lightning.json").read_text())
    assert info["method"] == "reward_model" and info["lora"] == lora
    card = (export / "README.md").read_text()
    assert "- **LoRA**: rank 4, alpha 8.0, target modules all-linear; merged into the weights" in card


def test_a_roberta_reward_model_trains_at_its_context_size_and_refuses_one_token_more(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # RoBERTa numbers positions from pad + 1, so its table of 256 + pad + 1 rows holds 256 tokens.
    folder = save_tiny_reward_model(tmp_path / "roberta", tiny_model_dir, architecture="roberta")
    model_config = AutoConfig.from_pretrained(folder)
    limit = model_config.max_position_embeddings - model_config.pad_token_id - 1
    assert limit == 256
    # Long enough that every row is cut to data.max_length tokens.
    long_pairs = [
        {
            "prompt": f"tell me about the sea {i} " * 40,
            "chosen": "the sea is lovely " * 80,
            "rejected": "no " * 300,
        }
        for i in range(4)
    ]
    train = write_jsonl(tmp_path / "long.jsonl", long_pairs)

    def config_file(max_length: int) -> Path:
        config = fit_config(
            tmp_path,
            folder,
            train,
            method="reward_model",
            trainer={"max_steps": 1, "enable_checkpointing": False},
            data={"batch_size": 2, "max_length": max_length, "max_prompt_length": 128},
            wandb={"enabled": False},
            export={"enabled": False},
        )
        return write_config(tmp_path / f"rm_{max_length}.yaml", config)

    code, err = run_main(["fit", "--config", str(config_file(limit + 1))], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert f"data.max_length={limit + 1} exceeds the model's context size ({limit} tokens" in errors[0]

    cli = PreferenceCLI(args=["fit", "--config", str(config_file(limit))])
    assert cli.trainer.global_step == 1
    assert next(iter(cli.datamodule.train_dataloader()))["input_ids"].shape[1] == limit
    with (tmp_path / "runs" / "version_0" / "metrics.csv").open() as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == 1 and math.isfinite(losses[0])


class LlamaConfig(PretrainedConfig):
    """A remote-code config named like a built-in one (the auto registry matches class names)."""

    model_type = "llama"


def test_the_position_offset_comes_from_transformers_own_models_only() -> None:
    assert config_position_offset(RobertaConfig()) == RobertaConfig().pad_token_id + 1 == 2
    assert config_position_offset(AutoConfig.for_model("llama")) == 0
    # Remote code is never built for the check: not a look-alike class, not a config with auto_map.
    look_alike = LlamaConfig(max_position_embeddings=64)
    assert config_position_offset(look_alike) == 0
    mapped = RobertaConfig(auto_map={"AutoModel": "custom.Model"})
    assert config_position_offset(mapped) == 0
    # A built-in base model that a config alone cannot build (dbrx needs more settings) is skipped.
    assert config_position_offset(AutoConfig.for_model("dbrx")) == 0
    # Without an offset the limit is max_position_embeddings itself.
    check_context_size(look_alike, 64)
    with pytest.raises(ConfigError, match=r"data.max_length=65 exceeds the model's context size \(64 tokens"):
        check_context_size(look_alike, 65)
