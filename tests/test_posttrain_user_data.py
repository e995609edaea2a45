"""Post-training on the researcher's own problems: a JSONL dataset whose column gives the curriculum's categories,
a user reward run in a worker process with a time limit (never through eval), any reasoning-gym task by name (its
scorer guarded against evaluating the completion), and a local model's own tokenizer and chat template; bad input
is one error line before Ray starts, and a user's folder runs end to end with ``metaopt run``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from conftest import run_metaopt_from
from metaopt import cli
from metaopt.errors import ConfigError
from metaopt.posttrain.rewards import Score
from metaopt.posttrain.tasks import make_taskset

ROWS = [
    {"prompt": "1+1", "answer": "2", "topic": "add"},
    {"prompt": "3-1", "answer": "2", "topic": "sub"},
    {"prompt": "2+2", "answer": "4", "topic": "add"},
    {"prompt": "5-4", "answer": "1", "topic": "sub"},
]

REWARDS = textwrap.dedent(
    """
    import os
    import time


    def score(completion, answer):
        with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as log:
            log.write(f"{completion!r} {answer!r}\\n")
        return float(completion.strip() == answer)


    def hang(completion, answer):
        if completion == "hang":
            while True:
                time.sleep(0.01)
        return 1.0


    def explode(completion, answer):
        if completion == "boom":
            raise RuntimeError("the user's bug")
        return 0.5


    def text(completion, answer):
        return "yes"


    def two_args_missing(completion):
        return 1.0
    """
)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder outside the package: problems.jsonl and rewards.py, the current directory."""
    write_jsonl(tmp_path / "problems.jsonl", ROWS)
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rewards", None)
    yield tmp_path
    sys.modules.pop("rewards", None)


# ------------------------------------------------------------------ the JSONL dataset and its categories


def test_jsonl_categories_come_from_the_column_in_file_order_or_as_ordered(user_folder):
    spec = {"path": str(user_folder / "problems.jsonl"), "category_key": "topic"}
    taskset = make_taskset([], 0, dataset=spec)
    try:
        assert taskset.categories == ["add", "sub"]  # order of first appearance
        assert [taskset.difficulty(c) for c in taskset.categories] == [1, 2]
        rng = np.random.default_rng(0)
        for category, prompts in (("add", {"Q:1+1 A:", "Q:2+2 A:"}), ("sub", {"Q:3-1 A:", "Q:5-4 A:"})):
            problem = taskset.sample(category, rng)
            assert problem.prompt in prompts and problem.category == category
            assert taskset.reward(problem, f" {problem.answer} <eos>x") == 1.0  # exact match, normalised
            assert taskset.reward(problem, problem.answer + "0") == 0.0
    finally:
        taskset.close()
    ordered = make_taskset([], 0, dataset={**spec, "category_order": ["sub", "add"]})
    assert ordered.categories == ["sub", "add"]
    single = make_taskset([], 0, dataset={"path": spec["path"], "max_rows": 2})
    source = single._sources["dataset"]
    assert single.categories == ["dataset"] and sorted(source.rows + source.held_out) == [("1+1", "2"), ("3-1", "2")]


def test_the_held_out_split_is_disjoint_covers_every_row_and_depends_only_on_split_seed(user_folder):
    """Per category a fixed share of the rows is held out: the same for every run seed, another for another
    split_seed; training draws only training rows, the evaluation only held-out rows, each once."""
    rows = [{"prompt": f"{c}{i}", "answer": str(i), "topic": c} for c in ("add", "sub") for i in range(20)]
    rows.append({"prompt": "sub20", "answer": "20", "topic": "sub"})
    write_jsonl(user_folder / "problems.jsonl", rows)
    spec = {"path": "problems.jsonl", "category_key": "topic"}

    def split(seed, **options):
        taskset = make_taskset([], seed, dataset={**spec, **options})
        return taskset, {c: (taskset._sources[c].rows, taskset._sources[c].held_out) for c in taskset.categories}

    taskset, parts = split(0)
    for category, (train, held_out) in parts.items():
        everything = [(r["prompt"], r["answer"]) for r in rows if r["topic"] == category]
        assert sorted(train + held_out) == sorted(everything) and not set(train) & set(held_out)
        assert len(held_out) == round(0.2 * len(everything))  # 4 of 20, 4 of 21
    assert split(7)[1] == parts and split(0, split_seed=1)[1] != parts  # the run's seed does not move it
    assert [len(h) for _, h in split(0, eval_fraction=0.5)[1].values()] == [10, 10]
    rng, held_out = np.random.default_rng(3), taskset.held_out()
    for category, (train, held) in parts.items():
        drawn = {(p.prompt, p.answer) for p in (taskset.sample(category, rng) for _ in range(300))}
        assert drawn == {(f"Q:{q} A:", a) for q, a in train}  # every training row, never a held-out one
        assert held_out.count(category, 32) == len(held) and held_out.count(category, 2) == 2
        evaluated = [(p.prompt, p.answer) for p in (held_out.sample(category, rng) for _ in range(len(held)))]
        assert evaluated == [(f"Q:{q} A:", a) for q, a in held]  # each held-out row once, in split order
    repeated = [*rows[:3], rows[0], rows[1], rows[0]]  # a prompt in several rows: all on one side
    write_jsonl(user_folder / "repeated.jsonl", repeated)
    for seed in range(5):
        source = make_taskset([], 0, dataset={"path": "repeated.jsonl", "split_seed": seed})._sources["dataset"]
        assert sorted(source.rows + source.held_out) == sorted((r["prompt"], r["answer"]) for r in repeated)
        assert not {p for p, _ in source.rows} & {p for p, _ in source.held_out} and len(source.held_out) in (1, 2, 3)
    write_jsonl(user_folder / "small.jsonl", rows[:3])
    for fraction, held in ((0.01, 1), (0.99, 2)):  # at least one row held out, at least one left to train
        small = make_taskset([], 0, dataset={"path": "small.jsonl", "eval_fraction": fraction})
        assert small.held_out().count("dataset", 32) == held and len(small._sources["dataset"].rows) == 3 - held


@pytest.mark.parametrize(
    "dataset, problem",
    [
        ({"category_key": "topic"}, "category 'mul' (column 'topic') has 1 row"),
        ({"category_key": None, "max_rows": 1}, "the file has 1 row"),
        ({"category_key": None, "path": "same.jsonl"}, "the file has 2 rows but 1 distinct prompt"),
    ],
)
def test_a_category_of_one_row_is_one_error_line(user_folder, capsys, dataset, problem):
    write_jsonl(user_folder / "problems.jsonl", [*ROWS, {"prompt": "2*3", "answer": "6", "topic": "mul"}])
    write_jsonl(user_folder / "same.jsonl", [ROWS[0], ROWS[0]])
    (user_folder / "exp.yaml").write_text(yaml.safe_dump(experiment(dataset)))
    assert cli.main(["run", "exp.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"metaopt: error: posttrain.dataset.path: {dataset.get('path', 'problems.jsonl')}: {problem}; the held-out "
        "split (eval_fraction) needs at least 2 distinct prompts per category: add rows\n"
    )
    assert not (user_folder / "mlflow.db").exists()


@pytest.mark.parametrize(
    "lines, problem",
    [
        ('{"prompt": "1+1", "answer": "2", "topic": "a"}\n{"prompt": "2+2", "answer": 4\n', "problems.jsonl:2: not"),
        ('{"prompt": "1+1", "answer": "2", "topic": "a"}\n{"prompt": "2+2", "topic": "b"}\n', "problems.jsonl:2: no"),
        ('{"prompt": "", "answer": "2", "topic": "a"}\n', "problems.jsonl:1: column 'prompt' must be"),
        ("[1, 2]\n", "problems.jsonl:1: expected a JSON object"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(user_folder, lines, problem):
    (user_folder / "problems.jsonl").write_text(lines)
    with pytest.raises(ConfigError) as err:
        make_taskset([], 0, dataset={"path": "problems.jsonl", "category_key": "topic"})
    assert str(err.value).startswith("posttrain.dataset.path: " + problem), str(err.value)
    write_jsonl(user_folder / "problems.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"^posttrain\.dataset\.category_order: lacks \['sub'\]"):
        make_taskset([], 0, dataset={"path": "problems.jsonl", "category_key": "topic", "category_order": ["add"]})


def test_a_line_over_the_limit_is_refused_without_reading_it_whole(user_folder, monkeypatch):
    """The file is read at most the limit + 1 bytes a line: a line without end (a multi-GB file with no newline)
    is one error naming file:line, never held in memory whole."""
    from metaopt.posttrain import dataset

    monkeypatch.setattr(dataset, "MAX_LINE_BYTES", 64)
    (user_folder / "problems.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + "x" * 10_000 + "\n")
    reads = []
    opened = dataset._open_capped

    class Spy:  # the file as read_dataset sees it, each line's length recorded
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def readline(self, size=-1):
            line = self.stream.readline(size)
            reads.append(len(line))
            return line

    def spied_open(path):
        return Spy(opened(path))

    monkeypatch.setattr(dataset, "_open_capped", spied_open)
    with pytest.raises(ConfigError, match=r"^posttrain\.dataset\.path: problems.jsonl:2: line longer than 64 bytes"):
        make_taskset([], 0, dataset={"path": "problems.jsonl"})
    assert max(reads) == 65  # the limit + 1, not the 10 kB line


# ------------------------------------------------------------------ the user's reward, with a time limit


def test_a_hanging_or_raising_reward_scores_zero_within_the_limit_and_is_counted(user_folder):
    from metaopt.posttrain.rewards import ScorerProcess

    scorer = ScorerProcess({"hang": {"kind": "user", "reference": "rewards:hang"}}, timeout_s=0.5)
    try:
        assert scorer.score("hang", "fine", "2").value == 1.0  # starts the worker process
        started = time.monotonic()
        result = scorer.score("hang", "hang", "2")
        assert result.value == 0.0 and "did not answer within reward_timeout_s=0.5" in result.problem
        assert time.monotonic() - started < 0.5 + 1.0  # the limit, not forever
        assert scorer.score("hang", "fine", "2").value == 1.0  # a fresh process after the stuck one was killed
        assert scorer.failures == 1 and scorer.restarts == 1
    finally:
        scorer.close()
    taskset = make_taskset([], 0, dataset={"path": "problems.jsonl", "reward": "rewards:explode"}, reward_timeout_s=5)
    try:
        problem = taskset.sample("dataset", np.random.default_rng(0))
        assert taskset.reward(problem, "boom") == 0.0 and taskset.reward_failures == 1
        assert taskset.reward(problem, "anything") == 0.5 and taskset.reward_failures == 1
    finally:
        taskset.close()


def test_the_users_reward_gets_the_completion_as_a_string(user_folder):
    taskset = make_taskset([], 0, dataset={"path": "problems.jsonl", "reward": "rewards:score"})
    try:
        problem = taskset.sample("dataset", np.random.default_rng(1))
        hostile = "__import__('os').system('touch pwned')"
        assert taskset.reward(problem, hostile) == 0.0
        assert taskset.reward(problem, problem.answer) == 1.0
    finally:
        taskset.close()
    calls = (user_folder / "calls.txt").read_text().splitlines()
    assert calls[0].startswith(repr(hostile)) and not (user_folder / "pwned").exists()


VOCAB_REWARD = textwrap.dedent(
    """
    import re


    def in_vocab(completion, answer):
        with open("vocab.txt") as words:  # relative: the user's folder, wherever the trial runs
            return float(completion.strip() in words.read().split())


    def backtracks(completion, answer):  # holds the GIL in C for ages: only a signal stops it
        return float(bool(re.match(r"(a+)+$", "a" * 64 + "b")))


    def hungry(completion, answer):
        return float(len(bytearray(3 << 30)))
    """
)


@pytest.fixture
def vocab_folder(tmp_path, monkeypatch):
    """The user's folder (vocab_rewards.py, vocab.txt) and a trial's folder elsewhere, the current directory, as
    Ray Tune runs a trial; the user's folder is known only from METAOPT_USER_DIR (as runtime.init sets it)."""
    user, trial = tmp_path / "user", tmp_path / "trial"
    user.mkdir(), trial.mkdir()
    (user / "vocab_rewards.py").write_text(VOCAB_REWARD)
    (user / "vocab.txt").write_text("apple pear\n")
    monkeypatch.chdir(trial)
    monkeypatch.setenv("METAOPT_USER_DIR", str(user))
    yield user
    sys.modules.pop("vocab_rewards", None)


def test_a_reward_opening_a_relative_file_reads_the_users_folder_from_a_trials_folder(vocab_folder, monkeypatch):
    from metaopt.posttrain.config import check_reward_returns_a_float
    from metaopt.posttrain.dataset import DatasetSpec
    from metaopt.posttrain.rewards import ScorerProcess

    scorer = ScorerProcess({"r": {"kind": "user", "reference": "vocab_rewards:in_vocab"}}, timeout_s=10)
    try:
        assert scorer.score("r", "pear", "") == Score(1.0) and scorer.score("r", "plum", "") == Score(0.0)
    finally:
        scorer.close()
    # the check before Ray: the validation's base (the folder the user ran in), not the current directory
    monkeypatch.delenv("METAOPT_USER_DIR")
    write_jsonl(vocab_folder / "problems.jsonl", [{"prompt": "a fruit", "answer": "apple"}])
    spec = DatasetSpec(path=str(vocab_folder / "problems.jsonl"), reward="vocab_rewards:in_vocab")
    check_reward_returns_a_float(spec, 10, base=vocab_folder)


PARENT_SCRIPT = textwrap.dedent(
    """
    import sys
    from metaopt.posttrain.rewards import ScorerProcess

    scorer = ScorerProcess({"r": {"kind": "user", "reference": "vocab_rewards:backtracks"}}, 600, sys.argv[1])
    print(scorer._start().pid, flush=True)
    scorer.score("r", "x", "x")  # never answers
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie is dead, waiting to be reaped
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_reward_process_dies_with_its_parent_even_stuck_in_c(vocab_folder):
    """A Ray worker killed (-9) mid-score leaves no reward process behind, even one whose scorer holds the GIL in C
    (the watchdog thread and the closed stdin cannot act then): prctl's parent-death signal kills it."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(vocab_folder)], stdout=subprocess.PIPE)
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.3)  # into the backtracking
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 2.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_reward_over_the_memory_cap_fails_with_memory_error_and_scores_zero(vocab_folder):
    from metaopt.posttrain.rewards import ScorerProcess

    scorer = ScorerProcess({"r": {"kind": "user", "reference": "vocab_rewards:hungry"}}, 10, memory_mb=1024)
    try:
        result = scorer.score("r", "x", "x")
        assert result.value == 0.0 and result.problem.startswith("raised MemoryError")
        assert scorer.restarts == 0  # the process lives on
    finally:
        scorer.close()


# ------------------------------------------------------------------ any reasoning-gym task by name


def test_any_reasoning_gym_task_by_name_with_its_options_and_own_scorer(user_folder):
    tasks = [
        {"name": "spell_backward", "options": {"min_word_len": 3, "max_word_len": 4}},
        {"name": "spell_backward", "label": "long_words", "options": {"min_word_len": 7, "max_word_len": 8}},
    ]
    taskset = make_taskset(tasks, 0, reward_timeout_s=30)
    try:
        assert taskset.categories == ["spell_backward", "long_words"]
        rng = np.random.default_rng(0)
        short, long = taskset.sample("spell_backward", rng), taskset.sample("long_words", rng)
        assert 3 <= len(short.answer) <= 4 and 7 <= len(long.answer) <= 8
        assert short.prompt.startswith("Q:Spell this word backward") and short.prompt.endswith(" A:")
        assert taskset.reward(short, short.answer) == 1.0 and taskset.reward(long, long.answer + "\n") == 1.0
        assert taskset.reward(short, short.answer[::-1] + "x") == 0.0 and taskset.reward_failures == 0
    finally:
        taskset.close()
    with pytest.raises(
        ConfigError, match=r"^posttrain\.tasks\.0\.name: unknown task 'spell_backwards'.*close matches: sp"
    ):
        make_taskset([{"name": "spell_backwards"}], 0)
    with pytest.raises(ConfigError, match=r"^posttrain\.tasks\.0\.options: spell_backward has no option 'colour'"):
        make_taskset([{"name": "spell_backward", "options": {"colour": 1}}], 0)
    with pytest.raises(ConfigError, match=r"^posttrain\.tasks\.0\.levels: task 'spell_backward' has no levels"):
        make_taskset([{"name": "spell_backward", "levels": [1]}], 0)


# ------------------------------------------------------------------ reasoning-gym never evaluates the completion


def test_a_scorer_that_evals_the_completion_scores_zero_and_runs_nothing(tmp_path):
    """string_insertion's scorer runs ``eval(answer)`` on a completion that is not the exact answer: refused in the
    worker process (0.0, a counted failure), and the payload never runs; its correct answer still scores 1.0."""
    marker = tmp_path / "pwned"
    taskset = make_taskset([{"name": "string_insertion"}], 0, reward_timeout_s=30)
    try:
        problem = taskset.sample("string_insertion", np.random.default_rng(0))
        assert taskset.reward(problem, f"__import__('os').system('touch {marker}')") == 0.0
        assert taskset.reward_failures == 1 and not marker.exists()
        assert taskset.reward(problem, str(list(problem.answer))) == 0.0  # a list of characters: eval'd, refused
        assert taskset.reward_failures == 2
        assert taskset.reward(problem, problem.answer) == 1.0 and taskset.reward_failures == 2
        result = taskset._scorers.score("string_insertion", "[1]", problem.answer, problem.index)
        assert result.refused == "eval" and result.problem == (
            "the scorer tried to evaluate the completion with eval; metaopt never evaluates model-written text"
        )
    finally:
        taskset.close()


GUARDS_SCRIPT = textwrap.dedent(
    """
    import types, sys
    import sympy
    from sympy import Symbol, sympify
    fake = types.ModuleType("reasoning_gym.fake_scorer")  # binds them by name, as reasoning-gym's modules do
    fake.sympify, fake.parse_expr = sympify, sympy.parse_expr
    sys.modules[fake.__name__] = fake
    from metaopt.posttrain.rewards import EvaluationRefused, evaluation_refused, install_evaluation_guards

    install_evaluation_guards()
    entry = {"answer": "x**2 + 1", "metadata": {"expression": "2*3"}}
    refused = []
    for call in (
        lambda: fake.sympify("x" + "**2"),
        lambda: fake.parse_expr("x" + "+1"),
        lambda: sympy.simplify("x" + "+x"),  # sympy's own sympify of text, ending in parse_expr
        lambda: eval("1" + "+1"),
        lambda: exec("y = 1"),
    ):
        try:
            with evaluation_refused(entry):
                try:
                    call()
                except Exception:  # as reasoning-gym's scorers do: it must not hide the refusal
                    pass
        except EvaluationRefused as err:
            refused.append(err.name)
    print(refused)
    with evaluation_refused(entry):
        x = Symbol("x")
        assert fake.sympify(3) == 3 and fake.sympify(x + 1) == x + 1  # numbers and built expressions convert
        assert fake.parse_expr(entry["answer"]) == x**2 + 1 and eval(entry["metadata"]["expression"]) == 6
        assert eval(compile("2+2", "<code>", "eval")) == 4  # a code object (imports run so)
    assert eval("1+1") == 2 and sympify("x") == Symbol("x")  # unguarded outside a scorer
    evaluated = 0
    for _ in range(50):  # a scorer that drops the entry's string: a new string may take its address
        entry = {"answer": "".join(["__imp", "ort__('os').getpid()"])}
        completion = "".join(["__imp", "ort__('os').getpid()"])
        try:
            with evaluation_refused(entry):
                entry["answer"] = None
                eval(completion.lower())
            evaluated += 1
        except EvaluationRefused:
            pass
    print(evaluated)
    print("ok")
    """
)


def test_the_guards_refuse_text_only_while_a_scorer_runs_and_let_the_entrys_own_strings_pass():
    result = subprocess.run([sys.executable, "-c", GUARDS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    names = "['sympy sympify', 'sympy parse_expr', 'sympy parse_expr', 'eval', 'exec']"
    assert result.stdout.splitlines() == [names, "0", "ok"]  # 0: the model's text was never evaluated


@pytest.fixture
def without_reasoning_gym(monkeypatch):
    """reasoning-gym as if not installed: importing it (or any of its modules) raises ImportError."""
    for name in [name for name in sys.modules if name.split(".")[0] == "reasoning_gym"] + ["reasoning_gym"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_task_names_are_looked_up_in_reasoning_gym_only_where_the_run_happens(without_reasoning_gym):
    """``metaopt submit``/``list`` (check_paths false) accept any well-formed task name and its options without
    importing reasoning-gym (the cluster has it); where the run happens, a missing reasoning-gym is one line."""
    from pydantic import ValidationError

    from metaopt.config import first_error, from_dict
    from metaopt.posttrain.tasks import TaskSpec

    elsewhere = {"check_paths": False}
    task = TaskSpec.model_validate({"name": "n_queens", "options": {"n": 5}}, context=elsewhere)
    assert task.name == "n_queens" and task.options == {"n": 5}
    assert TaskSpec.model_validate({"name": "chain_sum", "levels": [2], "options": {"x": 1}}, context=elsewhere)
    with pytest.raises(ValidationError) as bad_form:
        TaskSpec.model_validate({"name": "n queens"}, context=elsewhere)
    assert str(first_error("posttrain.tasks.0", TaskSpec, bad_form.value)).startswith(
        "posttrain.tasks.0.name: 'n queens' is not a task name"
    )
    with pytest.raises(ValidationError) as missing:
        TaskSpec.model_validate({"name": "n_queens"}, context={"check_paths": True})
    line = str(first_error("posttrain.tasks.0", TaskSpec, missing.value))
    assert line.startswith("posttrain.tasks.0.name: reasoning-gym did not import (") and "\n" not in line
    assert line.endswith("pip install 'metaopt-platform[posttrain]'")
    config = experiment({})  # a whole file, as metaopt submit/list validate it
    del config["posttrain"]["dataset"]
    config["posttrain"]["tasks"] = [{"name": "n_queens", "options": {"n": 5}}]
    assert from_dict(config, check_paths=False).section.tasks[0].options == {"n": 5}


def test_tasks_whose_scorer_evaluates_its_correct_answer_are_found():
    from metaopt.posttrain.tasks import evaluating_gym_task, task_specs

    tasks = task_specs([{"name": "arithmetic"}, {"name": "bitwise_arithmetic"}, {"name": "simple_integration"}])
    found = evaluating_gym_task(tasks, timeout_s=30)  # bitwise_arithmetic evals only its own problem: not refused
    assert found == (
        2,
        "reasoning-gym's 'simple_integration' scores by evaluating the completion (sympy parse_expr); metaopt "
        "never evaluates model-written text: choose another task or score it with your own reward on a JSONL dataset",
    )
    assert evaluating_gym_task(task_specs([{"name": "arithmetic"}, {"name": "countdown"}])) is None  # ours score


# ------------------------------------------------------------------ a local model's own tokenizer and chat template

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_local_models_tokenizer_and_chat_template_render_the_prompts(tmp_path):
    from metaopt.posttrain.config import ModelSpec
    from metaopt.posttrain.policy import build_tiny_policy, load_prompt_renderer, make_policy, prompt_renderer
    from metaopt.posttrain.sampling import sample_completions
    from metaopt.posttrain.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_policy("qwen2", len(tokenizer), 16, 1, 2, 64, seed=0)
    folder = tmp_path / "my-model"
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)

    loaded_model, loaded_tokenizer = make_policy({"path": str(folder)}, seed=0)  # local files only, no hub
    render = prompt_renderer(loaded_tokenizer)
    assert render("1+1") == "<|user|>1+1\n<|assistant|>"
    assert load_prompt_renderer({"path": str(folder)})("1+1") == "<|user|>1+1\n<|assistant|>"
    assert prompt_renderer(loaded_tokenizer, False)("1+1") == "Q:1+1 A:"
    taskset = make_taskset([{"name": "arithmetic", "levels": [1]}], 0, render=render)
    problem = taskset.sample("arithmetic/L1", np.random.default_rng(0))
    assert problem.prompt.startswith("<|user|>") and problem.prompt.endswith("<|assistant|>")
    batch = sample_completions(loaded_model, loaded_tokenizer, [problem.prompt], 2, 3, 1.0, 0)
    assert batch.input_ids.shape[0] == 2 and loaded_tokenizer.decode(batch.prompt_ids[0]) == problem.prompt

    plain = tmp_path / "no-template"
    build_char_tokenizer().save_pretrained(plain)
    context = {"base": str(tmp_path), "check_paths": True}
    with pytest.raises(ValueError, match=r"chat_template: is true but the tokenizer in .* has none"):
        ModelSpec.model_validate({"path": str(plain), "chat_template": True}, context=context)
    with pytest.raises(ValueError, match=r"chat_template: needs model\.path"):
        ModelSpec.model_validate({"chat_template": True})
    assert ModelSpec.model_validate({"path": str(folder), "chat_template": True}, context=context).chat_template


# ------------------------------------------------------------------ one-line errors before Ray starts


def experiment(dataset: dict, **posttrain) -> dict:
    return {
        "name": "own_data",
        "kind": "posttrain",
        "ray": {"num_cpus": 2, "cpus_per_trial": 0.2, "max_concurrent_trials": 1},
        "tracking": {"uri": "sqlite:///mlflow.db"},
        "posttrain": {
            "model": {"arch": "qwen2", "hidden": 16, "layers": 1, "heads": 2, "max_positions": 48},
            "dataset": {"path": "problems.jsonl", "category_key": "topic", **dataset},
            "curricula": ["sec"],
            "warmup": {"steps": 5, "batch_size": 8},
            "grpo": {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 3},
            "roles": {"mode": "colocated"},
            "steps": 2,
            "steps_per_iteration": 2,
            "eval_per_category": 2,
            "samples_to_log": 0,
            **posttrain,
        },
    }


@pytest.mark.parametrize(
    "dataset, field, problem",
    [
        ({"category_key": "level"}, "posttrain.dataset.path", "problems.jsonl:1: no column 'level'"),
        ({"reward": "my_rewards:score"}, "posttrain.dataset.reward", "'my_rewards:score': no module named"),
        ({"reward": "rewards:nothing"}, "posttrain.dataset.reward", "'rewards:nothing': rewards has no attribute"),
        ({"reward": "rewards:two_args_missing"}, "posttrain.dataset.reward", "'rewards:two_args_missing' must accept"),
        ({"reward": "rewards:text"}, "posttrain.dataset.reward", "'rewards:text' returned a str; expected a float"),
        ({"reward": "rewards:explode", "path": "boom.jsonl"}, "posttrain.dataset.reward", "'rewards:explode' raised"),
        ({"path": "missing.jsonl"}, "posttrain.dataset.path", "missing.jsonl': file not found"),
    ],
)
def test_bad_dataset_or_reward_is_one_error_line(user_folder, capsys, dataset, field, problem):
    write_jsonl(user_folder / "boom.jsonl", [{"prompt": p, "answer": "boom", "topic": "t"} for p in "pq"])
    (user_folder / "exp.yaml").write_text(yaml.safe_dump(experiment(dataset)))
    rc = cli.main(["run", "exp.yaml"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"metaopt: error: {field}: ") and problem in err, err
    assert not (user_folder / "mlflow.db").exists()


def test_a_reasoning_gym_task_that_evaluates_the_completion_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = experiment({})
    del config["posttrain"]["dataset"]
    config["posttrain"]["tasks"] = [{"name": "spell_backward"}, {"name": "polynomial_multiplication"}]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", "exp.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "metaopt: error: posttrain.tasks.1.name: reasoning-gym's 'polynomial_multiplication' scores by evaluating "
        "the completion (sympy parse_expr); metaopt never evaluates model-written text: choose another task or "
        "score it with your own reward on a JSONL dataset\n"
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_tasks_and_a_dataset_together_is_one_error_line(user_folder, capsys):
    (user_folder / "exp.yaml").write_text(yaml.safe_dump(experiment({}, tasks=[{"name": "arithmetic"}])))
    assert cli.main(["run", "exp.yaml"]) == 2
    assert capsys.readouterr().err == "metaopt: error: posttrain.tasks: give either tasks or a dataset, not both\n"


# ------------------------------------------------------------------ the user's folder, end to end


def test_metaopt_run_trains_on_the_users_jsonl_with_their_reward(tmp_path):
    """As a user runs it: their JSONL and rewards.py in a folder outside the package, ``metaopt run`` from there;
    SEC chooses between the file's two categories and the user's reward scores the completions."""
    write_jsonl(tmp_path / "problems.jsonl", ROWS)
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment({"reward": "rewards:score"})))
    result = run_metaopt_from(tmp_path, "exp.yaml", "--quiet")
    assert (
        "problems.jsonl (categories add, sub; train/held-out rows add 1/1, sub 1/1, split_seed 0; reward rewards:score)"
        in result.stdout
    )
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    answers = {line.rsplit(" ", 1)[1] for line in calls}
    # validation's one call, then 2 GRPO steps x 4 prompts x G=2, plus the greedy evaluation
    assert len(calls) >= 1 + 2 * 4 * 2 and answers <= {"'1'", "'2'", "'4'"}
