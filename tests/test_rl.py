"""On-policy methods: the RLOO estimator and online IPO against exact bandit solutions, the rollouts of the
modules against independent computations, the prompt data, and short in-process fits."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoTokenizer

from ipo_lightning.callbacks import GenerationEval
from ipo_lightning.data.sources import DataSource
from ipo_lightning.data.tokenize import PairTokenizer
from ipo_lightning.distributed import check_on_policy_strategy
from ipo_lightning.errors import ConfigError, DataError
from ipo_lightning.fsdp2 import PreferenceFSDP2Strategy
from ipo_lightning.losses import preference_loss
from ipo_lightning.rewards import RewardFunction, load_reward
from ipo_lightning.rl.data import PromptDataModule, collate_prompts
from ipo_lightning.rl.module import OnPolicyModule, resolve_on_policy_options
from ipo_lightning.rl.online import OnlineModule, online_loss, online_preferences
from ipo_lightning.rl.rloo import RLOOModule, rloo_advantages, rloo_loss
from tests.helpers import (
    REPO,
    fit_config,
    polite_pairs,
    run_main,
    save_tiny_reward_model,
    write_config,
    write_jsonl,
)

REWARD = "tests.reward_fixtures:length_reward"

# ----------------------------------------------------------------------------------- the bandit
# One-token completions: the policy is softmax(theta) over V tokens, every quantity is enumerable.

V = 4
REF = torch.tensor([0.4, 0.1, -0.3, 0.2], dtype=torch.float64).log_softmax(-1)
R = torch.tensor([1.0, 0.0, 0.5, -0.5], dtype=torch.float64)
THETA = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_rloo_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    kl = torch.tensor([[0.0, 2.0, -2.0]])
    # r' = [1, 1, 5] with beta 0.5; A_i = r'_i - mean of the two others.
    torch.testing.assert_close(rloo_advantages(rewards, kl, 0.5), torch.tensor([[-2.0, -2.0, 4.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(rewards[:, :1], kl[:, :1], 0.5)


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_expected_gradient_is_the_exact_gradient(k: int) -> None:
    """Enumerating every k-tuple of samples, weighted by its probability, the mean RLOO gradient equals
    -grad(E_pi[r] - beta KL(pi || ref)) computed by autograd on the exact objective."""
    beta = 0.3
    theta = THETA.clone().requires_grad_()
    logp = theta.log_softmax(-1)
    expected = torch.zeros(V, dtype=torch.float64)
    for tuple_ in itertools.product(range(V), repeat=k):
        ys = torch.tensor(tuple_)
        weight = logp.detach()[ys].sum().exp()
        loss, _ = rloo_loss(logp[ys][None], REF[ys][None], R[ys][None], beta)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        expected += weight * grad
    pi = logp.exp()
    objective = (pi * R).sum() - beta * (pi * (logp - REF)).sum()
    (exact,) = torch.autograd.grad(-objective, theta)
    assert exact.abs().max() > 0.05  # not a trivial zero
    torch.testing.assert_close(expected, exact, atol=1e-12, rtol=1e-10)


def test_rloo_converges_to_the_kl_regularised_optimum() -> None:
    """Sampled RLOO steps reach pi*(y) ∝ ref(y) exp(r(y)/beta): total variation below 0.005 after 400
    SGD steps of 64 prompts x 4 samples (it starts at 0.29)."""
    beta = 0.5
    optimum = (REF + R / beta).softmax(-1)
    theta = REF.clone().requires_grad_()
    optimizer = torch.optim.SGD([theta], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    assert total_variation(REF.exp(), optimum) > 0.25
    for _ in range(400):
        logp = theta.log_softmax(-1)
        ys = torch.multinomial(logp.detach().exp(), 64 * 4, replacement=True, generator=generator).view(64, 4)
        loss, _ = rloo_loss(logp[ys], REF[ys], R[ys], beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert total_variation(theta.detach().softmax(-1), optimum) < 0.005


# ----------------------------------------------------------------------------------- online IPO


def test_online_labels_from_rewards() -> None:
    rewards = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]])
    chosen, prob = online_preferences(rewards, 0.0)
    assert chosen.tolist() == [0, 1, 0]
    assert prob.tolist() == [1.0, 1.0, 0.5]
    chosen, prob = online_preferences(rewards, 2.0)
    assert chosen.tolist() == [0, 1, 0]
    torch.testing.assert_close(prob, torch.tensor([1 / (1 + math.exp(-1.0))] * 2 + [0.5]))


@pytest.mark.parametrize("loss_type", ["ipo", "dpo"])
def test_online_loss_of_a_hand_computed_pair(loss_type: str) -> None:
    policy = torch.tensor([[-1.0, -2.0]])
    reference = torch.tensor([[-1.5, -1.0]])
    rewards = torch.tensor([[0.0, 1.0]])  # sample 1 is chosen
    beta, temperature = 0.5, 1.0
    out, prob = online_loss(policy, reference, rewards, loss_type=loss_type, beta=beta, label_temperature=1.0)
    p = 1 / (1 + math.exp(-1.0 / temperature))
    h = (-2.0 + 1.0) - (-1.0 + 1.5)  # chosen log-ratio minus rejected log-ratio = -1.5
    if loss_type == "ipo":
        by_hand = (h - (2 * p - 1) / (2 * beta)) ** 2
    else:
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        by_hand = -p * math.log(sig(beta * h)) - (1 - p) * math.log(sig(-beta * h))
    assert float(out.losses[0]) == pytest.approx(by_hand, rel=1e-6)
    assert float(out.margins[0]) == pytest.approx(h)
    direct = preference_loss(
        policy[:, 1],
        policy[:, 0],
        reference[:, 1],
        reference[:, 0],
        loss_type=loss_type,
        beta=beta,
        preference_prob=prob,
    )
    torch.testing.assert_close(out.losses, direct.losses)


def _online_expected_loss(
    theta: torch.Tensor, beta: float, temperature: float, loss_type: str
) -> torch.Tensor:
    """Population online loss: every pair (y1, y2) of one-token samples weighted by mu(y1) mu(y2),
    mu = the current policy without gradient (the samples' distribution is not differentiated)."""
    logp = theta.log_softmax(-1)
    mu = logp.detach().exp()
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))
    out, _ = online_loss(
        logp[pairs], REF[pairs], R[pairs], loss_type=loss_type, beta=beta, label_temperature=temperature
    )
    weights = mu[pairs[:, 0]] * mu[pairs[:, 1]]
    return (weights * out.losses).sum()


def _online_ipo_fixed_point(beta: float, temperature: float) -> torch.Tensor:
    """Solve log pi(y) - log ref(y) = c + tau E_{y'~pi}[g(r(y) - r(y'))], tau = 1/(2 beta), g = sign
    (T = 0) or tanh(d / 2T) = 2 sigmoid(d/T) - 1, by damped iteration; returns log pi."""
    tau = 1 / (2 * beta)
    diff = R[:, None] - R[None, :]
    g = diff.sign() if temperature == 0 else torch.tanh(diff / (2 * temperature))
    logpi = REF.clone()
    for _ in range(2000):
        target = (REF + tau * (g @ logpi.exp())).log_softmax(-1)
        logpi = (0.5 * logpi + 0.5 * target).log_softmax(-1)
    return logpi


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_online_ipo_expected_gradient_vanishes_at_the_derived_fixed_point(temperature: float) -> None:
    beta = 0.5
    logpi = _online_ipo_fixed_point(beta, temperature)
    theta = logpi.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_online_expected_loss(theta, beta, temperature, "ipo"), theta)
    # Soft labels pass through IPO's float32 target; hard labels leave float64 exact.
    assert grad.abs().max() < (1e-10 if temperature == 0 else 1e-6)
    # Elsewhere (at the reference) it does not vanish, and descent raises the best token's probability.
    theta = REF.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_online_expected_loss(theta, beta, temperature, "ipo"), theta)
    assert grad.abs().max() > 1e-2
    assert -grad[R.argmax()] > 0 and -grad[R.argmin()] < 0


def test_online_dpo_expected_update_favours_the_higher_reward() -> None:
    """(Online DPO's population optimum is not derived here; its expected step direction is checked.)"""
    theta = REF.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_online_expected_loss(theta, 0.1, 0.0, "dpo"), theta)
    assert -grad[R.argmax()] > 0 and -grad[R.argmin()] < 0


# ----------------------------------------------------------------------------------- prompt data


def _prompt_file(tmp_path: Path) -> Path:
    records = [
        {"prompt": "Human: tell me about the sea. Assistant:"},
        {"prompt": "Human: tell me about bread. Assistant:"},
        {"prompt": "Human: tell me about the sea. Assistant:"},  # a repeat: kept once
        {"prompt": "Human: what is the capital of France? Assistant:"},
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", records)


def _datamodule(model_dir: Path, train: Path, **kwargs: object) -> PromptDataModule:
    options = {"max_length": 48, "max_prompt_length": 24, "batch_size": 2}
    options.update(kwargs)
    return PromptDataModule(
        train=DataSource(str(train)),
        tokenizer_name_or_path=str(model_dir),
        **options,  # type: ignore[arg-type]
    )


def test_prompt_data_from_a_prompt_file_and_a_preference_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair_tokenizer = PairTokenizer(tokenizer, 48, 6)
    datamodule = _datamodule(tiny_model_dir, _prompt_file(tmp_path), max_prompt_length=6)
    datamodule.setup("fit")
    rows = datamodule.train_dataset
    texts = [json.loads(raw) for raw in rows["prompt_json"]]
    assert texts == [
        "Human: tell me about the sea. Assistant:",
        "Human: tell me about bread. Assistant:",
        "Human: what is the capital of France? Assistant:",
    ]
    full = tokenizer(texts[2], add_special_tokens=True)["input_ids"]
    assert len(full) > 6 and rows[2]["prompt_ids"] == full[-6:]  # cut from the left, as training does
    assert rows["prompt_index"] == [0, 1, 2]
    # A preference set gives the prompts its pairs are tokenised with.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", polite_pairs(12))
    datamodule = _datamodule(tiny_model_dir, pairs, max_prompt_length=6)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 6  # 6 topics
    from ipo_lightning.data.formats import PreferenceExample

    first = polite_pairs(1)[0]
    pair = pair_tokenizer(PreferenceExample(first["prompt"], first["chosen"], first["rejected"]))
    assert datamodule.train_dataset[0]["prompt_ids"] == pair.prompt_ids


def test_prompt_data_chat_prompts_and_bad_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "tell me about bread"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages}])
    datamodule = _datamodule(tiny_model_dir, path)
    datamodule.setup("fit")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        datamodule.train_dataset[0]["prompt_ids"]
        == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: record 1: field 'prompt': expected a string"):
        _datamodule(tiny_model_dir, bad).setup("fit")
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "fine"}])
    with pytest.raises(DataError, match=r"no column 'prompt'"):
        _datamodule(tiny_model_dir, other).setup("fit")


# ----------------------------------------------------------------------------------- module rollouts


def _module(model_dir: Path, cls: type[OnPolicyModule] = RLOOModule, **kwargs: object) -> OnPolicyModule:
    """A module used without a Trainer: models loaded, tokenizer and reward set by hand."""
    options = {"max_new_tokens": 6, "max_length": 48, "samples_per_prompt": 3}
    if cls is OnlineModule:
        options.pop("samples_per_prompt")
    options.update(kwargs)
    module = cls(str(model_dir), REWARD, **options)  # type: ignore[arg-type]
    module.configure_model()
    module.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    module.reward_function = load_reward(REWARD, option="model.reward")
    return module


def _batch(model_dir: Path, tmp_path: Path) -> dict[str, object]:
    datamodule = _datamodule(model_dir, _prompt_file(tmp_path))
    datamodule.setup("fit")
    return collate_prompts([datamodule.train_dataset[i] for i in range(3)])


def _teacher_forced(
    model: torch.nn.Module, prompt: list[int], completion: list[int]
) -> tuple[float, list[float]]:
    """Summed log-prob of ``completion`` after ``prompt`` and the entropy at each of its positions, from
    one plain forward over the whole row (full logits, float64 log-softmax)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = logits[:-1].log_softmax(-1)
    positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    total = sum(float(logp[t, ids[0, t + 1]]) for t in positions)
    entropy = [float(-(logp[t].exp() * logp[t]).sum()) for t in positions]
    return total, entropy


def test_rollout_logprobs_equal_teacher_forcing_and_are_deterministic(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batch = _batch(tiny_model_dir, tmp_path)
    module = _module(tiny_model_dir)
    with torch.no_grad():  # a policy that differs from its reference
        module.policy.lm_head.weight.add_(0.05 * torch.randn(module.policy.lm_head.weight.shape))
    rollout = module.rollout(batch, seed=7)
    eos = module.tokenizer.eos_token_id
    entropies = []
    for i, prompt in enumerate(rollout.prompts):
        for j, completion in enumerate(rollout.completions[i]):
            assert rollout.ended[i, j] == (completion.token_ids[-1] == eos)
            assert rollout.lengths[i, j] == len(completion.token_ids)  # EOS counted when generated
            policy_logp, entropy = _teacher_forced(module.policy, prompt.ids, completion.token_ids)
            reference_logp, _ = _teacher_forced(module.reference.model, prompt.ids, completion.token_ids)
            assert rollout.policy_logps[i, j].item() == pytest.approx(policy_logp, abs=1e-4)
            assert float(rollout.reference_logps[i, j]) == pytest.approx(reference_logp, abs=1e-4)
            entropies += entropy
        assert rollout.rewards[i].tolist() == pytest.approx(
            [len(c.text) - len(prompt.text) / 10 for c in rollout.completions[i]]
        )
    torch.testing.assert_close(
        rollout.entropy.double(), torch.tensor(entropies, dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert rollout.kl.abs().max() > 1e-3
    assert rollout.policy_logps.requires_grad and not rollout.reference_logps.requires_grad

    # The same seed draws the same samples and gives the same loss, in a fresh module too.
    again = _module(tiny_model_dir)
    again.policy.load_state_dict(module.policy.state_dict())
    repeat = again.rollout(batch, seed=7)
    assert [[c.token_ids for c in row] for row in repeat.completions] == [
        [c.token_ids for c in row] for row in rollout.completions
    ]
    torch.testing.assert_close(again.rollout_loss(repeat)[0], module.rollout_loss(rollout)[0])
    other = module.rollout(batch, seed=8)
    assert [[c.token_ids for c in row] for row in other.completions] != [
        [c.token_ids for c in row] for row in rollout.completions
    ]


class _Recorder:
    """A reward (the ``score`` of a real :class:`RewardFunction`) that scores completion length and
    keeps every call's prompts, completions and conversations."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str], list[list[dict[str, str]]] | None]] = []

    def __call__(self, prompts: list[str], completions: list[str], conversations: list | None) -> list[float]:
        self.calls.append((prompts, completions, conversations))
        return [float(len(completion)) for completion in completions]


def test_rollout_gives_the_reward_conversations_only_for_all_chat_prompts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "tell me about bread"}]
    chat = _datamodule(tiny_model_dir, write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages}]))
    plain = _datamodule(tiny_model_dir, _prompt_file(tmp_path))
    chat.setup("fit")
    plain.setup("fit")
    module = _module(tiny_model_dir, samples_per_prompt=2)
    recorder = _Recorder()
    module.reward_function = RewardFunction("recorder", "model.reward", recorder)
    module.rollout(collate_prompts([chat.train_dataset[0], chat.train_dataset[0]]), seed=1)
    module.rollout(collate_prompts([chat.train_dataset[0], plain.train_dataset[0]]), seed=1)
    (_, _, all_chat), (_, _, mixed) = recorder.calls
    assert all_chat == [messages] * 4
    assert mixed is None  # a chat prompt first does not make the plain one an empty conversation


def test_a_prompt_draws_new_samples_each_epoch_and_a_rerun_draws_the_same(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two epochs over the same two prompts (one step each) with a policy that does not change (lr 0):
    the samples differ between the epochs only through the step's seed, and a rerun repeats both."""
    prompts = write_jsonl(
        tmp_path / "two.jsonl", [{"prompt": "Human: hi. Assistant:"}, {"prompt": "Human: bye. Assistant:"}]
    )

    def fit() -> dict[str, list[list[str]]]:
        datamodule = _datamodule(tiny_model_dir, prompts)
        module = RLOOModule(
            str(tiny_model_dir),
            REWARD,
            samples_per_prompt=2,
            max_new_tokens=6,
            max_length=48,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
        )
        recorder = _Recorder()
        module.reward_function = RewardFunction("recorder", "model.reward", recorder)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, datamodule)
        assert trainer.global_step == 2
        draws: dict[str, list[list[str]]] = {}  # prompt -> [its k samples in epoch 1, in epoch 2]
        for texts, completions, _ in recorder.calls:
            for start in range(0, len(texts), 2):
                draws.setdefault(texts[start], []).append(completions[start : start + 2])
        return draws

    first = fit()
    assert sorted(first) == ["Human: bye. Assistant:", "Human: hi. Assistant:"]
    for prompt, (epoch_1, epoch_2) in first.items():
        assert epoch_1 != epoch_2, prompt
    assert fit() == first


def test_module_losses_are_the_estimators_of_the_rollout(tiny_model_dir: Path, tmp_path: Path) -> None:
    batch = _batch(tiny_model_dir, tmp_path)
    module = _module(tiny_model_dir, missing_eos_penalty=2.0, beta=0.1)
    rollout = module.rollout(batch, seed=3)
    penalised = rollout.rewards - 2.0 * (~rollout.ended).float()
    torch.testing.assert_close(rollout.shaped_rewards, penalised)
    assert (~rollout.ended).any()  # 6 new tokens of a random model rarely end: the penalty applies
    loss, _ = module.rollout_loss(rollout)
    expected, _ = rloo_loss(rollout.policy_logps, rollout.reference_logps, penalised, 0.1)
    torch.testing.assert_close(loss, expected)

    online = _module(tiny_model_dir, OnlineModule, loss_type="ipo", label_temperature=0.5)
    assert online.hparams.beta == 1.0 and online.hparams.length_normalize is True
    rollout = online.rollout(batch, seed=3)
    loss, values = online.rollout_loss(rollout)
    norm = rollout.lengths.float()
    out, prob = online_loss(
        rollout.policy_logps / norm,
        rollout.reference_logps / norm,
        rollout.rewards,
        loss_type="ipo",
        beta=1.0,
        label_temperature=0.5,
    )
    torch.testing.assert_close(loss, out.losses.mean())
    torch.testing.assert_close(values["online/preference_prob"], prob)


def test_option_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        RLOOModule(str(tiny_model_dir), REWARD, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="precomputed cannot apply"):
        RLOOModule(str(tiny_model_dir), REWARD, reference="precomputed")
    with pytest.raises(ConfigError, match="label_temperature must be >= 0"):
        OnlineModule(str(tiny_model_dir), REWARD, label_temperature=-1.0)
    with pytest.raises(ConfigError, match="prefix_shared"):
        OnlineModule(str(tiny_model_dir), REWARD, batching="prefix_shared")


def test_hyperparameters_are_the_resolved_arguments(tiny_model_dir: Path) -> None:
    """hparams.yaml holds exactly the class's ``model.`` options as the CLI reads them (its own and
    OnPolicyModule's through ``**kwargs``), so a checkpoint's hyperparameters rebuild it, with the
    loss-dependent defaults resolved."""
    for cls in (RLOOModule, OnlineModule):
        module = cls(str(tiny_model_dir), REWARD)
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "model")
        arguments = set(vars(parser.get_defaults().model)) - {"optimizer", "max_length"}
        assert {"model_name_or_path", "beta", "dtype", "sampling_seed"} <= arguments
        assert "method_options" not in arguments
        assert set(module.hparams) == arguments
    assert RLOOModule(str(tiny_model_dir), REWARD).hparams.beta == 0.05
    dpo = OnlineModule(str(tiny_model_dir), REWARD, loss_type="dpo")
    assert (dpo.hparams.beta, dpo.hparams.length_normalize) == (0.1, False)


def test_label_temperature_defaults_by_reward(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A reward model's own Bradley-Terry probability is the label (T = 1); a function's scale is not a
    # probability, so it gets hard labels (T = 0). An explicit value wins.
    reward_model = save_tiny_reward_model(tmp_path / "rm", tiny_model_dir)
    expected = {
        str(reward_model): 1.0,
        "org/reward-model": 1.0,  # a hub id, as load_reward reads it
        REWARD: 0.0,
        "builtin:gold": 0.0,
        "ipo_lightning.gold:gold_reward": 0.0,
    }
    for reward, temperature in expected.items():
        assert OnlineModule(str(tiny_model_dir), reward).hparams.label_temperature == temperature, reward
        config = Namespace(
            model=Namespace(
                reward=reward,
                label_temperature=None,
                sampling_seed=0,
                reference="separate",
                lora=None,
                batching="padded",
                loss_type="ipo",
                beta=None,
                length_normalize=None,
            )
        )
        resolve_on_policy_options(config)  # what the CLI writes to config.yaml
        assert config.model.label_temperature == temperature, reward
    explicit = OnlineModule(str(tiny_model_dir), str(reward_model), label_temperature=0.0)
    assert explicit.hparams.label_temperature == 0.0


# ----------------------------------------------------------------------------------- fits


def _read_metrics(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


def _column_steps(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


@pytest.mark.parametrize("cls", [RLOOModule, OnlineModule])
def test_fit_logs_the_rollout_and_generation_metrics(
    cls: type[OnPolicyModule], tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompts = _prompt_file(tmp_path)
    datamodule = PromptDataModule(
        train=DataSource(str(prompts)),
        val={"first": DataSource(str(prompts)), "second": DataSource(str(prompts), limit=2)},
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=2,
    )
    module = cls(str(tiny_model_dir), REWARD, max_new_tokens=6, max_length=48)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            GenerationEval(reward=REWARD, prompts=2, samples_per_prompt=2, max_new_tokens=6, every_n_steps=2)
        ],
    )
    trainer.fit(module, datamodule)
    rows = _read_metrics(logger.log_dir)
    for name in ("reward", "kl", "entropy", "length", "eos_rate", "loss"):
        assert len(_column(rows, f"train/{name}")) == 4, name
    for name in ("reward", "kl", "entropy", "length", "eos_rate"):
        assert _column(rows, f"val/{name}") == _column(rows, f"val/first/{name}"), name
        assert len(_column(rows, f"val/second/{name}")) == 2
    assert all(0 < length <= 6 for length in _column(rows, "train/length"))
    assert all(0 <= rate <= 1 for rate in _column(rows, "train/eos_rate"))
    # The first step samples the initial policy, which is the reference: its sampled KL is 0.
    first = next(row for row in rows if row.get("train/kl"))
    assert abs(float(first["train/kl"])) < 1e-5
    assert _column(rows, "gen/reward") and _column(rows, "gen/win_rate")
    # Each validation's val/ values are at the step of its gen/ values: the optimizer steps taken.
    assert [step for step, _ in _column_steps(rows, "val/reward")] == [2, 4]
    assert {2, 4} <= {step for step, _ in _column_steps(rows, "gen/reward")}
    # gen/kl of the policy's own samples: 0 at step 0 (the policy is the reference), then not.
    kl = _column_steps(rows, "gen/kl")
    assert kl[0] == (0, 0.0) and kl[-1][1] != 0.0


def test_resume_mid_epoch_draws_what_the_uninterrupted_run_draws(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    prompts = write_jsonl(
        tmp_path / "many.jsonl", [{"prompt": f"Human: tell me about {i}. Assistant:"} for i in range(8)]
    )

    def fit(name: str, ckpt_path: str | None = None) -> list[dict[str, str]]:
        datamodule = PromptDataModule(
            train=DataSource(str(prompts)),
            tokenizer_name_or_path=str(tiny_model_dir),
            max_length=48,
            max_prompt_length=24,
            batch_size=2,
        )
        module = RLOOModule(
            str(tiny_model_dir),
            REWARD,
            max_new_tokens=6,
            max_length=48,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        )
        logger = CSVLogger(str(tmp_path), name=name)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=logger,
            log_every_n_steps=1,
            callbacks=[checkpoints],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        return [row for row in _read_metrics(logger.log_dir) if row.get("train/loss")]

    whole = fit("whole")  # 4 batches of 8 prompts: one epoch; the step-2 checkpoint is mid-epoch
    resumed = fit("resumed", ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert [row["step"] for row in resumed] == [row["step"] for row in whole[2:]]
    for name in ("train/loss", "train/reward", "train/kl", "train/length"):
        assert [float(row[name]) for row in resumed] == pytest.approx(
            [float(row[name]) for row in whole[2:]], abs=1e-6
        )
    assert len({row["train/reward"] for row in whole}) > 1  # different prompts and samples per step


@pytest.mark.parametrize("method", ["rloo", "online"])
def test_cli_fit_with_the_method(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--method`` builds the on-policy classes; the run writes its config, metrics and export (the
    divergence monitor, on by default, skips prompt data instead of failing)."""
    prompts = _prompt_file(tmp_path)
    config = fit_config(
        tmp_path,
        tiny_model_dir,
        prompts,
        val={"held_out": prompts},
        trainer={"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1},
        model={"reward": REWARD, "max_new_tokens": 6},
        data={"batch_size": 2},
        generation={"reward": REWARD, "prompts": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
        wandb={"enabled": False},
    )
    config["seed_everything"] = 7
    from ipo_lightning.cli import main

    main(["fit", "--config", str(write_config(tmp_path / "c.yaml", config)), "--method", method])  # no exit
    run = tmp_path / "runs" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == method and saved["model"]["batching"] in ("padded", "padding_free")
    assert saved["model"]["sampling_seed"] == 7  # null: seed_everything, so replicates sample differently
    if method == "online":
        assert (saved["model"]["beta"], saved["model"]["length_normalize"]) == (1.0, True)
        assert saved["model"]["label_temperature"] == 0.0  # null: a reward function's hard labels
    rows = _read_metrics(str(run))
    assert (
        len(_column(rows, "train/reward")) == 2
        and _column(rows, "val/reward")
        and _column(rows, "gen/reward")
    )
    assert not any(name.startswith("divergence/") for name in rows[0])
    # The CLI times every method's steps (log_every_n_steps=1: one row per step).
    assert len(_column(rows, "perf/step_time")) == 2 and all(t > 0 for t in _column(rows, "perf/step_time"))
    assert len(_column(rows, "perf/peak_memory_gb")) == 2
    export = run / "hf_model"
    assert (export / "config.json").is_file()
    # The export states the on-policy method and its settings, not a preference run's.
    info = json.loads((export / "ipo_lightning.json").read_text())
    expected = {"method": method, "reward": REWARD, "reference": "separate", "global_step": 2}
    if method == "rloo":
        expected |= {"samples_per_prompt": 4, "beta": 0.05, "length_normalize": False}
    else:
        expected |= {"samples_per_prompt": 2, "loss_type": "ipo", "beta": 1.0, "length_normalize": True}
        expected |= {"label_temperature": 0.0}
    assert {name: info.get(name) for name in expected} == expected
    card = ModelCard.load(export / "README.md")
    body = card.text
    assert "preference pairs" not in body and "training pairs" not in body
    assert f"`{REWARD}`" in body and ": 3 distinct training prompts" in body
    if method == "rloo":
        assert card.data.tags == ["ipo-lightning", "rloo", "rlhf"]
        assert "RLOO" in body and "- **beta** (weight of the KL penalty in the reward): 0.05" in body
        assert "- **Samples per prompt** k: 4" in body and "leave-one-out" in body
    else:
        assert card.data.tags == ["ipo-lightning", "online-ipo", "rlhf"]
        assert "online IPO" in body and "`method: online`, `loss_type: ipo`" in body
        assert "p = 1 (hard labels" in body and "- **beta**: 1 (target margin" in body
        assert "- **Length normalisation**: on" in body
    for name in ("val/reward", "val/kl", "gen/reward"):
        step, value = _column_steps(rows, name)[-1]
        assert f"| `{name}` | {value:.4g} | {step} |" in body, name


def test_kl_budget_on_prompt_data_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = _prompt_file(tmp_path)
    model = {"reward": REWARD, "max_new_tokens": 6}
    config = fit_config(tmp_path, tiny_model_dir, prompts, model=model, wandb={"enabled": False})
    args = ["fit", "--config", str(write_config(tmp_path / "c.yaml", config)), "--method", "rloo"]
    code, err = run_main([*args, "--kl_budget.max_kl", "1.0", "--trainer.max_steps", "1"], capsys)
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: kl_budget.max_kl watches divergence/kl, measured on held-out preference pairs")
    )


def test_strategies_that_cannot_gather_for_sampling_are_refused_at_start_up(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """FSDP and DeepSpeed are refused before anything loads, with one line naming the strategy and the
    ones that work; FSDP2, DDP and one device pass."""
    prompts = _prompt_file(tmp_path)
    model = {"reward": REWARD, "max_new_tokens": 6}
    config = fit_config(tmp_path, tiny_model_dir, prompts, model=model, wandb={"enabled": False})
    args = ["fit", "--config", str(write_config(tmp_path / "c.yaml", config)), "--method", "rloo"]
    args += ["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"), "--trainer.accelerator", "cpu"]
    code, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: trainer.strategy PreferenceFSDPStrategy: the on-policy methods sample")
    assert "configs/strategy/fsdp2.yaml" in lines[0]
    strategies = REPO / "configs" / "strategy"
    zero2 = yaml.safe_load((strategies / "deepspeed_zero2.yaml").read_text())["trainer"]["strategy"]
    with pytest.raises(ConfigError, match="trainer.strategy PreferenceDeepSpeedStrategy: the on-policy"):
        check_on_policy_strategy(zero2)
    fsdp2 = yaml.safe_load((strategies / "fsdp2.yaml").read_text())["trainer"]["strategy"]
    for passes in (fsdp2, PreferenceFSDP2Strategy(), "ddp", "auto", None):
        check_on_policy_strategy(passes)
