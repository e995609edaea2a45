"""metaopt.posttrain core: char tokenizer, tiny policies, verifiable tasks, curricula (SEC, Chen et al. 2025),
GRPO math (Shao et al. 2024) against hand computations and TRL's own loss code, the cached sampler against
``model.generate``, a learner step on a trivially learnable reward, and the supervised warm-up.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from metaopt.compat.trl import grpo_oracle
from metaopt.errors import ConfigError
from metaopt.posttrain.curriculum import (
    CURRICULUM_NAMES,
    SEC,
    EasyToHard,
    HardToEasy,
    category_rewards,
    make_curriculum,
)
from metaopt.posttrain.grpo import (
    LOSS_AGGREGATIONS,
    GRPOLearner,
    batch_logprobs,
    group_advantages,
    grpo_loss,
    k3_kl,
    token_logprobs,
)
from metaopt.posttrain.policy import (
    build_tiny_policy,
    get_weights,
    load_policy,
    make_policy,
    set_weights,
)
from metaopt.posttrain.sampling import concat_batches, position_ids, sample_completions
from metaopt.posttrain.tasks import TASK_NAMES, make_taskset, parse_completion
from metaopt.posttrain.tokenizer import (
    DEFAULT_ALPHABET,
    build_char_tokenizer,
    load_tokenizer,
)
from metaopt.posttrain.warmup import evaluate_accuracy, supervised_warmup

PROMPTS = ["Q:3+4 A:", "Q:12-7 A:", "Q:1 A:", "Q:99*9 A:", "Q:8-29-48 A:", "Q:7 from 1,2 A:"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def warm_policy():
    """A Qwen2 policy warmed up on arithmetic/L1 (it answers and stops with <eos>), with its warm-up record."""
    model, tokenizer = make_policy({"arch": "qwen2"}, seed=0)
    taskset = make_taskset([{"name": "arithmetic", "levels": [1]}], seed=0)
    before = evaluate_accuracy(model, tokenizer, taskset, taskset.categories, 50, seed=1, max_new_tokens=4)
    losses = []
    result = supervised_warmup(
        model,
        tokenizer,
        taskset,
        taskset.categories,
        steps=150,
        batch_size=32,
        lr=5e-3,
        seed=0,
        progress=lambda step, loss: losses.append((step, loss)),
    )
    return SimpleNamespace(
        model=model, tokenizer=tokenizer, taskset=taskset, before=before, result=result, losses=losses
    )


# ------------------------------------------------------------------ tokenizer


def test_char_tokenizer_round_trip_special_ids_and_left_padding():
    tokenizer = build_char_tokenizer()
    for text in [DEFAULT_ALPHABET, "Q:3+4 A: a , b !", "  (56+-33)-84\n", *PROMPTS]:
        ids = tokenizer.encode(text)
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    assert tokenizer.encode("é") == [tokenizer.unk_token_id]
    padded = tokenizer(["ab", "abcd"], padding=True)
    assert padded["input_ids"][0][:2] == [0, 0] and padded["attention_mask"][0] == [0, 0, 1, 1]
    ids = [*tokenizer.encode("12"), tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"


def test_char_tokenizer_saves_and_loads_with_auto_tokenizer(tmp_path):
    tokenizer = build_char_tokenizer(string.digits + "+-")
    tokenizer.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path, local_files_only=True), load_tokenizer(str(tmp_path))):
        assert loaded.encode("12+3") == tokenizer.encode("12+3")
        assert loaded.decode(loaded.encode("12+3")) == "12+3"
        assert loaded.padding_side == "left" and loaded.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ConfigError, match=r"posttrain\.model\.path: .*does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


# ------------------------------------------------------------------ policies


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_tiny_policies_forward_seeded_and_weight_sync(arch):
    model, tokenizer = make_policy({"arch": arch, "hidden": 32, "layers": 1, "heads": 2}, seed=3)
    ids = torch.tensor([tokenizer.encode("Q:3+4 A:")])
    logits = model(ids).logits
    assert logits.shape == (1, 8, len(tokenizer)) and torch.isfinite(logits).all()
    same, _ = make_policy({"arch": arch, "hidden": 32, "layers": 1, "heads": 2}, seed=3)
    other, _ = make_policy({"arch": arch, "hidden": 32, "layers": 1, "heads": 2}, seed=4)
    assert torch.equal(same(ids).logits, logits)
    assert not torch.allclose(other(ids).logits, logits)
    set_weights(other, get_weights(model))
    assert torch.equal(other(ids).logits, logits)


def test_load_policy_from_local_directory_and_clear_errors(tmp_path):
    model, tokenizer = make_policy({"arch": "gpt2", "hidden": 32, "layers": 1, "heads": 2}, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = make_policy({"path": str(tmp_path)}, seed=99)
    ids = torch.tensor([tokenizer.encode("Q:1 A:")])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.decode(loaded_tokenizer.encode("Q:1 A:")) == "Q:1 A:"
    with pytest.raises(ConfigError) as err:
        load_policy(str(tmp_path / "nope"))
    assert err.value.field == "posttrain.model.path" and "does not exist" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"posttrain\.model\.arch"):
        build_tiny_policy("llama", 10, 32, 1, 2, 32, seed=0)
    with pytest.raises(ConfigError, match=r"posttrain\.model\.heads"):
        make_policy({"hidden": 30, "heads": 4}, seed=0)


# ------------------------------------------------------------------ tasks


def test_every_task_rewards_its_demonstration_and_rejects_wrong_answers():
    taskset = make_taskset([{"name": name} for name in TASK_NAMES], seed=0)
    rng = np.random.default_rng(0)
    for category in taskset.categories:
        for _ in range(3):
            problem = taskset.sample(category, rng)
            answer = taskset.demonstration(problem)
            assert len(problem.prompt) < 60 and problem.prompt.startswith("Q:") and problem.prompt.endswith(" A:")
            assert taskset.reward(problem, answer) == 1.0, (category, problem)
            assert taskset.reward(problem, f" {answer} <eos>junk") == 1.0
            assert taskset.reward(problem, f"{answer}\nmore") == 1.0
            assert taskset.reward(problem, answer + "9") == 0.0, (category, problem)
            assert taskset.reward(problem, "") == 0.0
    assert parse_completion(" 12 <eos>3\n4") == "12"


def test_reasoning_gym_tasks_score_with_reasoning_gyms_own_scorer():
    taskset = make_taskset([{"name": "chain_sum", "levels": [1]}, {"name": "countdown", "levels": [1]}], seed=0)
    rng = np.random.default_rng(1)
    problem = next(p for p in (taskset.sample("chain_sum/L1", rng) for _ in range(50)) if p.answer.isdigit())
    assert problem.entry["answer"] == problem.answer
    assert taskset.reward(problem, "0" + problem.answer) == 1.0  # chain_sum's scorer tolerates leading zeros
    countdown = taskset.sample("countdown/L1", rng)
    a, b = countdown.entry["metadata"]["numbers"]
    target = countdown.entry["metadata"]["target"]
    solutions = [f"{x}{op}{y}" for x, y in ((a, b), (b, a)) for op in "+-*"]
    correct = [s for s in solutions if eval(s) == target]  # any valid expression scores, not only the reference
    assert correct and all(taskset.reward(countdown, s) == 1.0 for s in correct)


def test_categories_ordered_easy_to_hard_and_bad_specs_fail():
    taskset = make_taskset([{"name": "chain_sum", "levels": [3, 1]}, {"name": "arithmetic", "levels": [2, 1]}], 0)
    assert taskset.categories == ["chain_sum/L1", "chain_sum/L3", "arithmetic/L1", "arithmetic/L2"]
    assert [taskset.difficulty(c) for c in taskset.categories] == [1, 3, 1, 2]
    with pytest.raises(ConfigError, match=r"^posttrain\.tasks\.0\.name: unknown task 'nope'; allowed: arithmetic"):
        make_taskset([{"name": "nope", "levels": [1]}], 0)
    with pytest.raises(ConfigError, match=r"^posttrain\.tasks\.0\.levels: task 'arithmetic' has no level 9; levels"):
        make_taskset([{"name": "arithmetic", "levels": [1, 9]}], 0)
    with pytest.raises(ConfigError, match=r"posttrain\.tasks"):
        make_taskset([], 0)


# ------------------------------------------------------------------ curricula


def test_sec_td0_update_and_boltzmann_probabilities_by_hand():
    sec = SEC(3, alpha=0.5, tau=0.5)
    assert np.allclose(sec.probabilities(), 1 / 3)
    sec.update({0: 0.8, 2: 0.2})
    assert np.allclose(sec.q, [0.4, 0.0, 0.1])  # Q <- 0.5 r + 0.5 Q, unseen category 1 unchanged
    sec.update({0: 0.0})
    assert np.allclose(sec.q, [0.2, 0.0, 0.1])
    weights = np.exp(np.array([0.2, 0.0, 0.1]) / 0.5)
    assert np.allclose(sec.probabilities(), weights / weights.sum())
    counts = np.bincount(sec.sample(np.random.default_rng(0), 20000), minlength=3) / 20000
    assert np.allclose(counts, sec.probabilities(), atol=0.02)
    flat = SEC(3, alpha=1.0, tau=1e6)
    flat.update({0: 1.0, 1: 0.3})
    assert np.allclose(flat.probabilities(), 1 / 3, atol=1e-6)


def test_sec_state_round_trips_through_json_and_targets_the_learning_frontier():
    sec = make_curriculum("sec", 3, alpha=0.3, tau=0.1)
    success = np.array([0.95, 0.5, 0.02])  # too easy, frontier, too hard
    rng = np.random.default_rng(0)
    for _ in range(30):
        picks = sec.sample(rng, 8)
        rewards = torch.tensor(rng.random((8, 8)) < success[picks, None], dtype=torch.float32).flatten()
        sec.update(category_rewards(picks, group_advantages(rewards, 8), 8))
    assert sec.probabilities().argmax() == 1
    restored = make_curriculum("sec", 3)
    restored.load_state_dict(json.loads(json.dumps(sec.state_dict())))
    assert np.allclose(restored.probabilities(), sec.probabilities()) and restored.alpha == 0.3


def test_category_rewards_are_mean_absolute_advantage_per_category():
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, -2.0])
    assert category_rewards([4, 7, 4], advantages, 2) == {4: 1.5, 7: 0.0}


def test_easy_to_hard_moves_mass_to_harder_categories_and_hard_to_easy_mirrors():
    easy, hard = EasyToHard(4), HardToEasy(4)
    means = []
    for step in range(0, 101, 10):
        easy.advance(step, 100)
        hard.advance(step, 100)
        means.append(easy.probabilities() @ np.arange(4))
        assert np.allclose(hard.probabilities(), easy.probabilities()[::-1])
    assert means[0] == 0 and means[-1] == 3 and all(b >= a for a, b in itertools.pairwise(means))
    window = make_curriculum("easy_to_hard", 4, window=2)
    window.advance(50, 100)
    assert np.allclose(window.probabilities(), [0, 0.5, 0.5, 0])
    copy_ = make_curriculum("easy_to_hard", 4, window=2)
    copy_.load_state_dict(json.loads(json.dumps(window.state_dict())))
    assert np.allclose(copy_.probabilities(), window.probabilities())
    assert np.allclose(make_curriculum("uniform", 4).probabilities(), 0.25)
    by_level = make_curriculum("easy_to_hard", 4, difficulties=[1, 2, 1, 2])  # two tasks, two levels each
    fronts = []
    for step in (0, 30, 60, 90):
        by_level.advance(step, 120)
        fronts.append(int(by_level.probabilities().argmax()))
    assert fronts == [0, 2, 1, 3]
    backwards = make_curriculum("hard_to_easy", 4, difficulties=[1, 2, 1, 2])
    assert backwards.probabilities().argmax() == 3


def test_curriculum_and_task_options_are_validated_once_by_their_models():
    """Curricula and task sets built from plain keywords or mappings are validated by their options models on
    the way in; a validated model is run as is. The section's names come from the same registries."""
    from metaopt.posttrain.config import PostTrainSection
    from metaopt.posttrain.curriculum import CURRICULA, EasyToHardOptions, SECOptions
    from metaopt.posttrain.tasks import TASK_LEVELS, TaskSpec

    with pytest.raises(ConfigError, match=r"^posttrain.curriculum.alpha: Input should be less than or equal to 1"):
        SEC(3, {"alpha": 2.0})
    with pytest.raises(ConfigError, match=r"^posttrain.curriculum.window: Input should be a valid integer"):
        EasyToHard(3, window=1.5)
    with pytest.raises(TypeError, match="HardToEasy runs 'hard_to_easy' options"):
        HardToEasy(3, EasyToHardOptions())
    assert make_curriculum(SECOptions(tau=0.3), 2).tau == 0.3
    assert make_curriculum({"name": "easy_to_hard", "window": 2}, 3).window == 2
    with pytest.raises(ConfigError, match=r"^posttrain.tasks.1: task 'arithmetic' is listed twice"):
        make_taskset([{"name": "arithmetic", "levels": [1]}, TaskSpec(name="arithmetic", levels=[2])], 0)
    with pytest.raises(ConfigError, match=r"^posttrain.tasks.0.levels.0: must be an integer, not true"):
        make_taskset([{"name": "arithmetic", "levels": [True]}], 0)
    products = make_taskset([TaskSpec(name="products")], 0)
    assert products.categories == [f"products/L{i}" for i in TASK_LEVELS["products"]]
    assert CURRICULA.names() == CURRICULUM_NAMES and tuple(TASK_LEVELS) == TASK_NAMES
    section = PostTrainSection(curricula=list(CURRICULUM_NAMES), tasks=[{"name": "chain_sum"}])
    assert section.tasks[0].levels == [1, 2, 3]  # the section's default levels; make_taskset's default is all


def test_make_curriculum_rejects_bad_names_and_options():
    assert CURRICULUM_NAMES == ("sec", "uniform", "easy_to_hard", "hard_to_easy")
    with pytest.raises(ConfigError, match=r"^posttrain\.curriculum\.name: must be one of sec, uniform, easy_to_hard"):
        make_curriculum("x", 3)
    with pytest.raises(ConfigError, match=r"posttrain\.curriculum\.alpha"):
        make_curriculum("sec", 3, alpha=0.0)
    with pytest.raises(ConfigError, match=r"posttrain\.curriculum\.tau"):
        make_curriculum("sec", 3, tau=-1)
    with pytest.raises(ConfigError, match=r"posttrain\.curriculum\.window"):
        make_curriculum("uniform", 3, window=2)


# ------------------------------------------------------------------ GRPO math


def test_group_advantages_zero_mean_unbiased_std_and_equal_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4)
    grouped = rewards.reshape(3, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=True, keepdim=True) + 1e-4)
    assert torch.allclose(adv, expected.flatten())
    assert torch.allclose(adv.reshape(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))  # all-equal group: no signal
    assert torch.allclose(adv[:4], torch.tensor([1, -1, -1, 1]) * 0.5 / (math.sqrt(1 / 3) + 1e-4))
    assert torch.allclose(
        group_advantages(rewards, 4, scale=False), (grouped - grouped.mean(1, keepdim=True)).flatten()
    )
    with pytest.raises(ConfigError, match=r"posttrain\.group_size"):
        group_advantages(rewards, 1)


def test_grpo_loss_analytic_cases():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.1])
    # rho = 1 and beta = 0: loss = -mean advantage, and the gradient is the policy gradient -A/|o| per token
    loss, metrics = grpo_loss(logp, None, None, adv, mask, beta=0.0)
    assert torch.isclose(loss, -adv.mean())
    assert metrics == {"kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 1.0}
    loss.backward()
    assert torch.allclose(logp.grad, -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 4)
    # k3 >= 0, = 0 at logp == ref
    ref = torch.randn(4, 5)
    assert (k3_kl(logp.detach(), ref) >= 0).all()
    assert torch.equal(k3_kl(ref, ref), torch.zeros(4, 5))
    # hand computation, one sequence of two tokens: ratios e^0.5 (clipped to 1.2) and e^-0.5; A = 1; beta = 0.1
    one_logp = torch.tensor([[0.0, -1.0]])
    one_old = torch.tensor([[-0.5, -0.5]])
    one_ref = torch.tensor([[0.0, 0.0]])
    loss, metrics = grpo_loss(one_logp, one_old, one_ref, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.1)
    kl_second = math.exp(1.0) - 1.0 - 1.0
    expected = ((-1.2) + (-math.exp(-0.5) + 0.1 * kl_second)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(metrics["clip_fraction"], 0.5) and math.isclose(metrics["kl"], kl_second / 2, rel_tol=1e-6)


def reference_grpo_loss(logp, old, ref, adv, mask, eps, beta, aggregation):
    """Eq. 3 of Shao et al. 2024 written out token by token (the slow, obvious version)."""
    per_sequence, total, tokens = [], 0.0, 0
    for i in range(len(logp)):
        terms = []
        for t in range(len(logp[i])):
            if mask[i][t] == 0:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            surrogate = min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            terms.append(-surrogate + beta * kl)
        per_sequence.append(sum(terms) / len(terms))
        total, tokens = total + sum(terms), tokens + len(terms)
    return sum(per_sequence) / len(per_sequence) if aggregation == "sequence_mean" else total / tokens


def random_loss_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(6, 7, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])
    mask = (torch.arange(7)[None] < lengths[:, None]).to(torch.float64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_grpo_loss_matches_token_by_token_reference(aggregation):
    logp, old, ref, adv, mask = random_loss_inputs(1)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.04, aggregation=aggregation)
    expected = reference_grpo_loss(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.04, aggregation
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-10)


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_grpo_loss_matches_trl_grpo_trainer_loss(aggregation):
    """TRL's GRPOTrainer._compute_loss run on the same per-token log-probs is the oracle (its own code path,
    with the model forward stubbed to return our log-probs: metaopt.compat.trl). Fails, never skips, when TRL's
    internals change."""
    logp, old, ref, adv, mask = random_loss_inputs(2)
    trl_loss, trl_metrics = grpo_oracle(logp, old, ref, adv, mask, beta=0.04, epsilon=0.2, aggregation=aggregation)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.04, aggregation=aggregation)
    assert math.isclose(loss.item(), trl_loss, rel_tol=1e-10)
    assert math.isclose(metrics["kl"], trl_metrics["kl"], rel_tol=1e-10)
    assert math.isclose(metrics["clip_fraction"], trl_metrics["clip_fraction"], rel_tol=1e-6)


def test_group_advantages_match_trl_nanstd():
    from trl.trainer import utils  # a declared test dependency: the oracle fails, never skips, if it moves

    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.2, 0.9])
    grouped = rewards.reshape(2, 3)
    trl_adv = (grouped - grouped.mean(1, keepdim=True)) / (utils.nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 3), trl_adv.flatten())


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_sampler_at_vanishing_temperature_equals_greedy_generate(arch):
    model, tokenizer = make_policy({"arch": arch, "hidden": 32, "layers": 2, "heads": 2}, seed=1)
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    greedy = model.generate(**encoded, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=2)
    for temperature in (1e-6, 0.0):
        batch = sample_completions(model, tokenizer, PROMPTS, 1, 6, temperature, 0)
        assert torch.equal(batch.completion_ids, greedy[:, encoded["input_ids"].shape[1] :])


def test_sampler_stops_at_eos_like_generate_on_a_warm_policy(warm_policy):
    model, tokenizer = warm_policy.model, warm_policy.tokenizer
    prompts = ["Q:3+4 A:", "Q:9+9 A:", "Q:0+1 A:", "Q:5+8 A:"]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    greedy = model.generate(**encoded, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=2)
    batch = sample_completions(model, tokenizer, prompts, 1, 6, 0.0, 0)
    assert torch.equal(batch.completion_ids, greedy[:, encoded["input_ids"].shape[1] :])
    assert batch.completion_ids.shape[1] < 6  # every row hit <eos> early
    eos_at = (batch.completion_ids == tokenizer.eos_token_id).int().argmax(1)
    expected_mask = (torch.arange(batch.completion_ids.shape[1])[None] <= eos_at[:, None]).long()
    assert torch.equal(batch.completion_mask, expected_mask)
    assert batch.completions == [tokenizer.decode(row[:n]) for row, n in zip(batch.completion_ids.tolist(), eos_at)]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_sampling_logprobs_equal_a_fresh_forward_and_survive_concatenation(arch, warm_policy):
    if arch == "qwen2":
        model, tokenizer = warm_policy.model, warm_policy.tokenizer
    else:
        model, tokenizer = make_policy({"arch": arch, "hidden": 32, "layers": 2, "heads": 2}, seed=2)
    gen = torch.Generator().manual_seed(5)
    first = sample_completions(model, tokenizer, PROMPTS[:4], 3, 6, 0.7, gen)
    second = sample_completions(model, tokenizer, PROMPTS[4:], 3, 4, 0.7, gen)
    assert len(first) == 12 and first.completions[0] != "" and first.input_ids.requires_grad is False
    for batch in (first, second, concat_batches([first, second])):
        width = batch.completion_mask.shape[1]
        fresh = token_logprobs(model, batch.input_ids, batch.attention_mask, width, temperature=0.7)
        masked = batch.completion_mask.bool()
        assert torch.allclose(fresh[masked], batch.old_logprobs[masked], atol=1e-4)
    joined = concat_batches([first, second])
    assert joined.completions == first.completions + second.completions and joined.group_size == 3
    assert joined.prompt_length == max(first.prompt_length, second.prompt_length)


# ------------------------------------------------------------------ shared-prompt log-probs


class ForwardShapes:
    """Records the ``input_ids`` shape of every forward of ``model``: which path token_logprobs took."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.shapes.append(tuple(kwargs["input_ids"].shape))

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self.shapes

    def __exit__(self, *exc):
        self.handle.remove()


def logprobs_and_gradients(model, batch, weights, group_size):
    """Log-probs [B, T] by token_logprobs with ``group_size``, the gradient of mean(weights * logp) w.r.t. every
    parameter (random weights on every position: any loss's backward is such a vector-Jacobian product), and
    the forward shapes."""
    model.zero_grad(set_to_none=True)
    with ForwardShapes(model) as shapes:
        logp = token_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.completion_mask.shape[1],
            batch.temperature,
            group_size=group_size,
        )
    (logp * weights).mean().backward()
    return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, shapes


def two_sampled_batches(model, tokenizer, seed):
    """Prompts of different lengths (left padding), G = 3, and a second batch with shorter completions, so the
    concatenation has extra left padding and completions right-padded under a zero mask."""
    gen = torch.Generator().manual_seed(seed)
    first = sample_completions(model, tokenizer, PROMPTS[:4], 3, 6, 1.0, gen)
    second = sample_completions(model, tokenizer, PROMPTS[4:], 3, 4, 1.0, gen)
    return concat_batches([first, second])


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_shared_prompt_logprobs_and_gradients_equal_one_full_forward(arch):
    model, tokenizer = make_policy({"arch": arch, "hidden": 32, "layers": 2, "heads": 2}, seed=3)
    batch = two_sampled_batches(model, tokenizer, 7)
    rows, width, prompt_length = len(batch), batch.completion_mask.shape[1], batch.prompt_length
    assert (batch.attention_mask[:, 0] == 0).any() and (batch.attention_mask[:, prompt_length - 1] == 1).all()
    assert (batch.completion_mask == 0).any() and width > 1
    model.train()
    weights = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    full, full_grads, full_shapes = logprobs_and_gradients(model, batch, weights, group_size=1)
    shared, shared_grads, shared_shapes = logprobs_and_gradients(model, batch, weights, group_size=3)
    assert full_shapes == [(rows, prompt_length + width)]  # group_size 1: one full forward
    assert shared_shapes == [(rows // 3, prompt_length), (rows, width - 1)]  # each prompt once, then completions
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)  # every position, padding included
    assert shared_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5, msg=name)
    masked = batch.completion_mask.bool()  # and both are the sampler's own log-probs
    assert torch.allclose(shared[masked], batch.old_logprobs[masked], atol=1e-4)
    with torch.inference_mode():  # the reference forward: batch_logprobs, no autograd
        torch.testing.assert_close(batch_logprobs(model, batch), full, rtol=0, atol=1e-5)


def test_grouped_logprobs_fall_back_to_one_full_forward_without_group_structure():
    model, tokenizer = make_policy({"hidden": 32, "layers": 2, "heads": 2}, seed=4)
    batch = two_sampled_batches(model, tokenizer, 8)

    def check(part, group_size, expected_shapes):
        plain = token_logprobs(
            model, part.input_ids, part.attention_mask, part.completion_mask.shape[1], part.temperature
        )
        with ForwardShapes(model) as shapes:
            grouped = batch_logprobs(model, part, group_size)
        assert shapes == expected_shapes
        torch.testing.assert_close(grouped, plain, rtol=0, atol=1e-5)

    rows, full_row, prompt_length = len(batch), batch.input_ids.shape[1], batch.prompt_length
    shared = [(rows // 3, prompt_length), (rows, full_row - prompt_length - 1)]
    swapped = torch.arange(rows)
    swapped[[2, 3]] = swapped[[3, 2]]  # row 3 (prompt 1) joins the group of prompt 0
    check(batch.select(swapped), 3, [(rows, full_row)])
    check(batch.select(torch.arange(5)), 3, [(5, full_row)])  # rows do not split into groups
    assert batch.select(torch.arange(6)).group_size == 1
    check(batch.select(torch.arange(6)), None, [(6, full_row)])
    check(batch.select(torch.arange(6, 12)), 3, [(2, prompt_length), (6, full_row - prompt_length - 1)])
    one_token = sample_completions(model, tokenizer, PROMPTS, 2, 1, 1.0, 0)  # width 1: the prompt pass alone
    check(one_token, None, [(len(PROMPTS), one_token.prompt_length)])
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # turns the KV cache off when training with gradients: then one full forward
    model.train()
    check(batch, None, [(rows, full_row)])
    with torch.no_grad():  # without gradients the layers keep their cache
        check(batch, None, shared)
    model.eval()
    check(batch, None, shared)


def test_learner_runs_each_prompt_once_in_minibatches_of_whole_groups():
    model, tokenizer = make_policy({"hidden": 32, "layers": 1, "heads": 2}, seed=5)
    batch = sample_completions(model, tokenizer, PROMPTS[:4], 4, 3, 1.0, 0)
    width, prompt_length = batch.completion_mask.shape[1], batch.prompt_length
    for minibatch_size, expected in [
        (8, [(2, prompt_length), (8, width - 1)] * 2),  # whole groups: shared prompts
        (6, [(6, prompt_length + width)] * 2 + [(1, prompt_length), (4, width - 1)]),  # the last one is a group
    ]:
        learner = GRPOLearner(
            model, optimizer_spec={"name": "sgd", "lr": 1e-3}, minibatch_size=minibatch_size, beta=0.0
        )
        with ForwardShapes(model) as shapes:
            learner.step(batch, torch.linspace(-1, 1, 16))
        assert shapes == expected, minibatch_size


# ------------------------------------------------------------------ learner


def starts_with_one_probability(model, tokenizer, prompts):
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded, position_ids=position_ids(encoded["attention_mask"])).logits[:, -1]
    return logits.softmax(-1)[:, tokenizer.convert_tokens_to_ids("1")].mean().item()


def test_learner_raises_reward_on_a_trivially_learnable_reward():
    tokenizer = build_char_tokenizer("0123")
    model = build_tiny_policy("qwen2", len(tokenizer), 32, 1, 2, 32, seed=0)
    prompts = ["0", "12", "3", "20"]
    learner = GRPOLearner(
        model, copy.deepcopy(model), optimizer_spec={"name": "adamw", "lr": 1e-2}, beta=0.04, updates_per_batch=2
    )
    before = starts_with_one_probability(model, tokenizer, prompts)
    gen = torch.Generator().manual_seed(0)
    rewards_seen = []
    for _ in range(8):
        batch = sample_completions(model, tokenizer, prompts, 8, 3, 1.0, gen)
        rewards = torch.tensor([float(text.startswith("1")) for text in batch.completions])
        metrics = learner.step(batch, group_advantages(rewards, 8))
        rewards_seen.append(rewards.mean().item())
    after = starts_with_one_probability(model, tokenizer, prompts)
    assert before < 0.2 and after > 0.6, (before, after)
    assert np.mean(rewards_seen[-2:]) > np.mean(rewards_seen[:2]) + 0.3
    assert (
        metrics["optimizer_steps"] == 2
        and metrics["kl"] > 0
        and set(metrics) >= {"loss", "lr", "grad_norm", "clip_fraction"}
    )


def test_learner_minibatches_schedule_fixed_old_policy_and_state_round_trip():
    model, tokenizer = make_policy({"hidden": 32, "layers": 1, "heads": 2}, seed=0)
    schedule = {"name": "linear_decay", "lr": 0.05, "total_steps": 8, "end_lr": 0.01}
    learner = GRPOLearner(
        model,
        optimizer_spec={"name": "adamw", "lr": 0.05},
        schedule_spec=schedule,
        updates_per_batch=2,
        minibatch_size=8,
        beta=0.0,
    )
    batch = sample_completions(model, tokenizer, PROMPTS[:4], 4, 3, 1.0, 0)
    batch.old_logprobs = None  # the learner must take pi_old from one forward before its first update
    advantages = torch.linspace(-1.5, 1.5, 16)
    metrics = learner.step(batch, advantages)
    assert metrics["optimizer_steps"] == 4 and learner.optimizer_steps == 4
    assert math.isclose(metrics["lr"], 0.05 + (0.01 - 0.05) * 3 / 8)
    assert metrics["clip_fraction"] > 0 and metrics["ratio_mean"] != 1.0  # later passes see a moved policy
    clone, _ = make_policy({"hidden": 32, "layers": 1, "heads": 2}, seed=1)
    restored = GRPOLearner(clone, optimizer_spec={"name": "adamw", "lr": 0.05}, schedule_spec=schedule)
    restored.load_state_dict(learner.state_dict())
    assert restored.optimizer_steps == 4
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), model.parameters()))
    assert restored.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()
    with pytest.raises(ConfigError, match=r"posttrain\.grpo\.updates_per_batch"):
        GRPOLearner(model, optimizer_spec={"name": "adamw"}, updates_per_batch=0)


def test_the_experiment_files_grpo_block_sets_the_learners_aggregation_and_minibatch():
    """posttrain.grpo.loss_aggregation / minibatch_size reach the learner; the section offers exactly the
    aggregations the loss implements, each with its TRL oracle (metaopt.compat.trl.LOSS_TYPES)."""
    from typing import get_args

    from metaopt.compat.trl import LOSS_TYPES
    from metaopt.posttrain.config import GRPOSpec, LossAggregation
    from metaopt.posttrain.roles import LearnerWorker

    assert get_args(LossAggregation) == LOSS_AGGREGATIONS == tuple(LOSS_TYPES)
    assert GRPOSpec().loss_aggregation == "sequence_mean" and GRPOSpec().minibatch_size is None
    spec = GRPOSpec(group_size=4, prompts_per_step=4, minibatch_size=8, loss_aggregation="token_mean")
    worker = LearnerWorker(
        {"hidden": 32, "layers": 1, "heads": 2},
        [{"name": "arithmetic", "levels": [1]}],
        0,
        grpo=spec.model_dump(),
        optimizer={"name": "sgd", "lr": 1e-3},
        schedule=None,
    )
    try:
        assert (worker.learner.aggregation, worker.learner.minibatch_size) == ("token_mean", 8)
    finally:
        worker.taskset.close()
    with pytest.raises(ConfigError, match=r"posttrain\.grpo\.loss_aggregation"):
        GRPOLearner(worker.model, optimizer_spec={"name": "sgd", "lr": 1e-3}, aggregation="sum")


# ------------------------------------------------------------------ warm-up


def test_supervised_warmup_beats_chance_on_arithmetic_level_one(warm_policy):
    result = warm_policy.result
    assert warm_policy.before == {"arithmetic/L1": 0.0}
    assert result["steps"] == 150 and len(warm_policy.losses) == 150
    assert result["loss"] < result["initial_loss"] / 4
    after = evaluate_accuracy(
        warm_policy.model,
        warm_policy.tokenizer,
        warm_policy.taskset,
        warm_policy.taskset.categories,
        50,
        seed=1,
        max_new_tokens=4,
    )
    assert after["arithmetic/L1"] > 0.3  # chance is about 1/19 (answers 0..18)
