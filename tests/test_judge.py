"""judge on a chat val set: distinct prompts, batched greedy completions, the reward model's own template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ipo_lightning.analysis.judge import judge_run
from ipo_lightning.cli import main
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.datamodule import HELD_OUT_NAME
from ipo_lightning.data.prompts import held_out_prompts
from ipo_lightning.generation_metrics import win_rate
from ipo_lightning.gold import gold_reward
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import polite_pairs, run_main, save_tiny_reward_model, write_jsonl

USERS = [
    "tell me about the sea",
    "tell me about bread",
    "write a short poem",
    "what is the capital of France",
]


def _chat_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A run folder whose exported policy is another tiny model (same tokenizer) and a chat val set."""
    run_dir = tmp_path / "run" / "version_0"
    save_tiny_model(
        run_dir / "hf_model", CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, seed=1
    )
    records = [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": user}],
            "chosen": "thank you",
            "rejected": "go away",
        }
        for user in USERS
    ]
    val = write_jsonl(tmp_path / "chat_val.jsonl", records + records[:1])  # one repeated prompt
    config = {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"val": {"chat": {"path": str(val)}}, "max_length": 64, "max_prompt_length": 48},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.csv").write_text("step\n0\n")
    return run_dir


def test_the_judge_feeds_the_reward_model_its_own_chat_rendering(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run_dir = _chat_run(tmp_path, tiny_model_dir)
    reward_dir = save_tiny_reward_model(tmp_path / "reward", tiny_model_dir)
    fed: list[list[int]] = []

    pad = AutoTokenizer.from_pretrained(reward_dir).pad_token_id

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # The reward model's token embedding (width 16; the policies' is 32) sees every row it scores.
        if isinstance(module, torch.nn.Embedding) and module.embedding_dim == 16:
            fed.extend([token for token in row if token != pad] for row in args[0].tolist())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = judge_run(run_dir, str(reward_dir), prompts=10, max_new_tokens=8, batch_size=3)
    finally:
        handle.remove()

    saved = json.loads((run_dir / "judge.json").read_text())
    samples = saved["samples"]
    assert len(samples) == result.prompts == len(USERS)  # distinct prompts only
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    expected = {"policy": [], "reference": []}
    for user, sample in zip(USERS, samples, strict=True):
        conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": user}]
        assert sample["prompt"] == tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        for side in expected:
            messages = [*conversation, {"role": "assistant", "content": sample[side]}]
            expected[side].append(list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]))
    assert sorted(fed) == sorted(expected["policy"] + expected["reference"])
    assert [s["policy"] for s in samples] != [s["reference"] for s in samples]  # two different models

    # Scores: the reward model on each rendering alone; the win rate recomputed from them.
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    with torch.no_grad():
        for side in expected:
            alone = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in expected[side]]
            assert [s[f"{side}_score"] for s in samples] == pytest.approx(alone, abs=1e-5, rel=1e-5)
    policy = [s["policy_score"] for s in samples]
    reference = [s["reference_score"] for s in samples]
    wins = sum(p > r for p, r in zip(policy, reference, strict=True))
    ties = sum(p == r for p, r in zip(policy, reference, strict=True))
    assert saved["win_rate"] == pytest.approx((wins + ties / 2) / len(samples))
    assert saved["win_rate"] == win_rate(policy, reference).win_rate == result.win_rate
    assert (saved["wins"], saved["ties"]) == (wins, ties)
    assert saved["reward"] == str(reward_dir) and saved["val_set"] == "chat"


def test_the_judge_takes_a_module_function_reward_by_the_old_option_name(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _chat_run(tmp_path, tiny_model_dir)
    shutil.rmtree(run_dir / "hf_model")
    shutil.copytree(tiny_model_dir, run_dir / "hf_model")  # policy = reference: every prompt ties
    main(["judge", str(run_dir), "--reward_model", "ipo_lightning.gold:gold_reward", "--prompts", "2"])
    assert "win rate 0.500" in capsys.readouterr().out
    saved = json.loads((run_dir / "judge.json").read_text())
    samples = saved["samples"]
    assert [s["policy_score"] for s in samples] == gold_reward(
        [s["prompt"] for s in samples], [s["policy"] for s in samples]
    )
    assert saved["ties"] == saved["prompts"] == 2


def test_the_judge_loads_both_models_in_the_runs_dtypes(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = _chat_run(tmp_path, tiny_model_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"].update({"dtype": "bfloat16", "reference_dtype": "float16"})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    seen: list[torch.dtype] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if isinstance(module, torch.nn.Embedding) and module.embedding_dim == 32:  # the policies' width
            seen.append(module.weight.dtype)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        judge_run(run_dir, "ipo_lightning.gold:gold_reward", prompts=2, max_new_tokens=2)
    finally:
        handle.remove()
    # The policy generates first (2 steps), then the reference: the run's dtype, then reference_dtype.
    assert seen == [torch.bfloat16] * 2 + [torch.float16] * 2


def test_the_judge_draws_the_val_fraction_held_out_prompts_the_run_validated_on(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run_dir = _chat_run(tmp_path, tiny_model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(20))
    data = {"train": {"path": str(train)}, "val_fraction": 0.25, "seed": 5, "train_size": 6}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"] = {**data, "max_length": 64, "max_prompt_length": 48}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    judge_run(run_dir, "ipo_lightning.gold:gold_reward", prompts=10, max_new_tokens=2)
    saved = json.loads((run_dir / "judge.json").read_text())

    module = PreferenceDataModule(
        train=DataSource(str(train)),
        val_fraction=0.25,
        seed=5,
        train_size=6,
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=48,
    )
    module.setup("fit")
    expected = [prompt.text for prompt in held_out_prompts(module, HELD_OUT_NAME, 10)]
    assert saved["val_set"] == HELD_OUT_NAME and [s["prompt"] for s in saved["samples"]] == expected
    assert saved["prompts"] == len(expected) >= 2


BROKEN_REWARD = "tests.reward_fixtures_broken:reward"  # loading it fails (its module's import does)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "{run}: no such run folder"),
        ("no_export", "{run}: no hf_model/ export to judge"),
        ("bad_yaml", "{run}/config.yaml: not valid YAML"),
        ("no_val_set", "{run}: the run has no validation set"),
    ],
)
def test_the_judge_reports_a_bad_run_folder_before_it_loads_the_reward(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], damage: str, expected: str
) -> None:
    run_dir = _chat_run(tmp_path, tiny_model_dir)
    if damage == "missing":
        run_dir = run_dir.parent / "version_9"
    elif damage == "no_export":
        shutil.rmtree(run_dir / "hf_model")
    elif damage == "bad_yaml":
        (run_dir / "config.yaml").write_text("model: {model_name_or_path: [unclosed\n")
    else:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["data"] = {**config["data"], "train": config["data"]["val"]["chat"], "val": {}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()  # the setup's output
    code, stderr = run_main(["judge", str(run_dir), "--reward", BROKEN_REWARD], capsys)
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # not data progress bars
    assert len(errors) == 1 and errors[0].startswith("error: " + expected.format(run=run_dir)), stderr
    assert "Traceback" not in stderr
    assert not (run_dir / "judge.json").exists()


def test_the_broken_reward_fixture_fails_to_load_on_a_sound_run_folder(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The counterpart of the test above: with nothing wrong in the run folder, the reward's own error shows.
    run_dir = _chat_run(tmp_path, tiny_model_dir)
    code, stderr = run_main(["judge", str(run_dir), "--reward", BROKEN_REWARD], capsys)
    assert code == 2 and "ipo_lightning_no_such_dependency" in stderr and str(run_dir) not in stderr
