"""load_reward: module:function, builtin:gold and reward-model folders; one-line errors; validated scores."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from ipo_lightning.errors import ConfigError
from ipo_lightning.gold import gold_reward
from ipo_lightning.rewards import RewardError, load_reward, reward_model_inputs
from tests.helpers import save_tiny_reward_model
from tests.reward_fixtures import length_reward

OPTION = "--generation.reward"
PROMPTS = ["Write Lena a note about the party.", "Thank Milo for the concert.", "Hi"]
COMPLETIONS = ["Dear Lena, see you at the party. Thank you.", "Dear Milo, thanks!", " there, how are you?"]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("reward"), tiny_model_dir)


def test_a_module_function_reward_scores_and_returns_plain_floats() -> None:
    reward = load_reward("tests.reward_fixtures:length_reward", option=OPTION)
    scores = reward(PROMPTS, COMPLETIONS, conversations=[[{"role": "user", "content": p}] for p in PROMPTS])
    assert scores == length_reward(PROMPTS, COMPLETIONS)
    assert scores == [len(c) - len(p) / 10 for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert all(type(score) is float for score in scores)
    assert reward.name == "tests.reward_fixtures:length_reward"


def test_a_dotted_attribute_path_reaches_a_static_method() -> None:
    assert load_reward("tests.reward_fixtures:Scorer.score", option=OPTION)(PROMPTS, COMPLETIONS) == [1.0] * 3


@pytest.mark.parametrize("spec", ["builtin:gold", "ipo_lightning.gold:gold_reward"])
def test_the_gold_reward_by_either_spec_equals_calling_it_directly(spec: str) -> None:
    scores = load_reward(spec, option=OPTION)(PROMPTS, COMPLETIONS)
    assert scores == gold_reward(PROMPTS, COMPLETIONS)
    assert scores[0] > 0  # a real score, not a constant


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("tests.no_such_rewards:reward", "no module named 'tests.no_such_rewards'"),
        ("no_such_package.rewards:reward", "no module named 'no_such_package'"),
        (
            "tests.reward_fixtures_broken:reward",
            "importing 'tests.reward_fixtures_broken' failed: ModuleNotFoundError: "
            "No module named 'ipo_lightning_no_such_dependency'",
        ),
        ("tests.reward_fixtures:missing", "'tests.reward_fixtures' has no attribute 'missing'"),
        ("tests.reward_fixtures:Scorer.nope", "'tests.reward_fixtures.Scorer' has no attribute 'nope'"),
        ("tests.reward_fixtures:NOT_CALLABLE", "'NOT_CALLABLE' is a float, not callable"),
        (
            "tests.reward_fixtures:prompts_only",
            "cannot be called as prompts_only(prompts, completions); it takes (prompts): "
            "too many positional arguments",
        ),
        (
            "tests.reward_fixtures:keyword_only",
            "cannot be called as keyword_only(prompts, completions); it takes (*, prompts, completions): "
            "too many positional arguments",
        ),
    ],
)
def test_a_bad_callable_spec_is_one_line_at_load_time(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_reward(spec, option=OPTION)
    assert str(error.value) == f"{OPTION} {spec!r}: {problem}"


@pytest.mark.parametrize(
    ("function", "problem"),
    [
        ("one_short", "returned 2 values for 3 prompts"),
        ("nan_at_last", "value 2 is nan, not a finite number"),
        ("inf_at_first", "value 0 is inf, not a finite number"),
        ("bool_at_second", "value 1 is True (bool), not a number"),
        ("text_values", "value 0 is '1.0' (str), not a number"),
        ("none_value", "value 0 is None (NoneType), not a number"),
        ("a_string", "returned str, not a list of 3 numbers"),
    ],
)
def test_a_bad_result_is_a_reward_error_naming_the_reward_and_the_value(function: str, problem: str) -> None:
    spec = f"tests.reward_fixtures:{function}"
    reward = load_reward(spec, option=OPTION)  # the signature is fine: only the call can tell
    with pytest.raises(RewardError) as error:
        reward(PROMPTS, COMPLETIONS)
    assert str(error.value) == f"{OPTION} {spec!r}: {problem}"
    assert isinstance(error.value, ConfigError)  # the CLI prints it as one line


def _direct_scores(folder: Path, rows: list[list[int]]) -> list[float]:
    """The reward model's logit 0 for each row, one row at a time (no padding at all)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in rows]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert", "roberta"])
def test_batched_reward_model_scores_equal_scoring_each_text_alone(
    tiny_model_dir: Path, tmp_path: Path, padding_side: str, architecture: str
) -> None:
    # gpt2 has absolute positions (left padding would shift them); roberta counts positions from
    # padding_idx + 1 (position ids from the mask would shift them); bert pools its first token.
    folder = save_tiny_reward_model(tmp_path / "reward", tiny_model_dir, architecture=architecture)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": padding_side}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.padding_side == padding_side
    prompts = [f"Human: tell me about {topic}. Assistant:" for topic in ("the sea", "bread", "a fox")] * 3
    completions = [" thank you" * (i + 1) for i in range(len(prompts))]  # 9 lengths: padding in every batch
    reward = load_reward(str(folder), option=OPTION, device="cpu", batch_size=4)
    scores = reward(prompts, completions)
    rows = [tokenizer(p + c)["input_ids"] for p, c in zip(prompts, completions, strict=True)]
    expected = _direct_scores(folder, rows)
    # float32 noise only (measured: at most 5e-7 on scores of about 3): padded rows change the shapes
    # of the matrix products (another summation order), not what is summed; the attention mask keeps
    # the real tokens' computation.
    assert scores == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert max(expected) - min(expected) > 0.05  # the scores differ by far more than the tolerance


def test_a_chat_reward_model_scores_its_own_chat_template_rendering(reward_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    conversations = [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "tell me about bread"}],
        [{"role": "user", "content": "tell me about the sea"}],
    ]
    completions = ["here is a clear answer", "the sea is blue"]
    prompts = ["policy-rendered prompt text 1", "policy-rendered prompt text 2"]  # not used for chat
    own = [
        list(
            tokenizer.apply_chat_template(
                [*conversation, {"role": "assistant", "content": completion}], tokenize=True
            )["input_ids"]
        )
        for conversation, completion in zip(conversations, completions, strict=True)
    ]
    assert reward_model_inputs(tokenizer, prompts, completions, conversations) == own
    assert tokenizer.decode(own[1]).startswith("<|im_start|>user\ntell me about the sea<|im_end|>")

    fed: list[list[int]] = []
    reward = load_reward(str(reward_dir), option=OPTION, device="cpu")
    model = reward.score.model

    def record(module: torch.nn.Module, args: tuple, kwargs: dict[str, torch.Tensor]) -> None:
        rows = zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True)
        fed.extend(ids[mask.bool()].tolist() for ids, mask in rows)  # the real tokens of each row

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        scores = reward(prompts, completions, conversations=conversations)
    finally:
        handle.remove()
    assert sorted(fed) == sorted(own)
    assert scores == pytest.approx(_direct_scores(reward_dir, own), abs=1e-5, rel=1e-5)
    # Without conversations the same model scores prompt + completion text instead.
    plain = reward_model_inputs(tokenizer, prompts, completions)
    assert plain == [tokenizer(p + c)["input_ids"] for p, c in zip(prompts, completions, strict=True)]


def test_a_long_prompt_is_cut_from_its_start_so_the_completion_is_kept(reward_dir: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    # Special tokens around every plain text, as a BERT-style tokenizer adds them ([CLS] ... [SEP]).
    first, last = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", first), ("<|im_end|>", last)]
    )
    prompt, completions = "thank you " * 50, ["please go away", "have a nice day"]
    rows = reward_model_inputs(tokenizer, [prompt] * 2, completions, max_length=20)
    for row, completion in zip(rows, completions, strict=True):
        body = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        assert len(body) > 20 and row == [first, *body[-18:], last]
        assert tokenizer.decode(row[1:-1]).endswith(completion)
    assert rows[0] != rows[1]  # the cut no longer leaves only the shared prompt

    # A chat rendering keeps its end (the completion and the template's closing tokens) and its BOS.
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    conversation = [{"role": "system", "content": "thank you " * 50}, {"role": "user", "content": "hello"}]
    (row,) = reward_model_inputs(tokenizer, [""], ["please go away"], [conversation], max_length=20)
    rendering = tokenizer.apply_chat_template(
        [*conversation, {"role": "assistant", "content": "please go away"}], tokenize=True
    )["input_ids"]
    assert len(rendering) > 20 and row == [tokenizer.bos_token_id, *rendering[-19:]]
    assert tokenizer.decode(row).endswith("please go away<|im_end|>\n")


def test_reward_model_scores_of_long_prompts_depend_on_the_completion(reward_dir: Path) -> None:
    reward = load_reward(str(reward_dir), option=OPTION, device="cpu")
    reward.score.max_length = 8  # far shorter than the prompt
    scores = reward(["thank you " * 50] * 2, [" please go away", " have a nice day"])
    assert abs(scores[0] - scores[1]) > 1e-3


def test_a_reward_model_on_the_accelerator_when_there_is_one(reward_dir: Path) -> None:
    reward = load_reward(str(reward_dir), option=OPTION)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(reward.score.model.parameters()).device.type == expected


def _with_only_bin_weights(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_bad_reward_model_folders_are_one_line_at_load_time(
    reward_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    def problem(spec: str) -> str:
        with pytest.raises(ConfigError) as error:
            load_reward(spec, option=OPTION, device="cpu")
        message = str(error.value)
        assert message.startswith(f"{OPTION} {spec!r}: ") and "\n" not in message
        return message.removeprefix(f"{OPTION} {spec!r}: ")

    assert problem(str(tiny_model_dir)) == (
        "a LlamaForCausalLM checkpoint is not a sequence-classification reward model "
        "(loading it would add a randomly initialised score head)"
    )
    two_labels = save_tiny_reward_model(tmp_path / "two", tiny_model_dir, num_labels=2)
    assert problem(str(two_labels)) == (
        "the model has num_labels 2; a reward model has one output (its logit 0 is the score)"
    )
    pickled = tmp_path / "pickled"
    shutil.copytree(reward_dir, pickled)
    _with_only_bin_weights(pickled)
    assert problem(str(pickled)).startswith("the folder holds only pickled .bin weights")
    assert problem(str(tmp_path / "nowhere")).startswith("no such folder")


def test_validation_refuses_nonfinite_scores_from_a_reward_model(reward_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    shutil.copytree(reward_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], math.nan)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    reward = load_reward(str(broken), option=OPTION, device="cpu")
    with pytest.raises(RewardError, match=r"value 0 is nan, not a finite number$"):
        reward(PROMPTS, COMPLETIONS)


def test_a_roberta_reward_model_scores_a_text_longer_than_its_position_table(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # RoBERTa's layout: pad id 1, 514 position rows, positions from pad + 1 = 2, so 512 tokens at most.
    # The tiny tokenizer reports no model_max_length; its id 1 (EOS, never in these texts) is the pad.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(1)
    assert tokenizer.pad_token_id == 1 and tokenizer.model_max_length > 1_000_000
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=1,
        max_position_embeddings=514,
        initializer_range=0.5,
    )
    folder = tmp_path / "roberta"
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt, completion = "tell me about the sea " * 60, "thank you for the bread"
    ids = AutoTokenizer.from_pretrained(folder)(prompt + completion)["input_ids"]
    assert len(ids) > 514 and 1 not in ids

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with pytest.raises((IndexError, RuntimeError), match="out of"):  # 513 tokens reach position 514
        model(input_ids=torch.tensor([ids[-513:]]))
    expected = _direct_scores(folder, [ids[-512:]])  # the tokenizer adds no special tokens: the end

    scores = load_reward(str(folder), option=OPTION, device="cpu")([prompt], [completion])
    assert scores == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert _direct_scores(folder, [ids[-400:]]) != pytest.approx(expected, abs=1e-3)  # the cut matters
