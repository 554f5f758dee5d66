"""A data set on disk as a task: JSON lines and CSV, text and chat prompts, held-out records, seeded
epochs that a cursor resumes exactly, and the errors a wrong file or column gives; the text rewards."""

from __future__ import annotations

import csv
import json

import pytest

from asyncflow.tasks import rewards
from asyncflow.tasks.dataset import Dataset


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def chat_file(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"What is {i} plus 1?"}], "answer": i + 1}
        for i in range(10)
    ]
    return write_jsonl(tmp_path / "train.jsonl", records)


def test_epochs_are_seeded_permutations_and_a_cursor_resumes_them(chat_file):
    data = Dataset(chat_file, messages="messages")
    first = [data.example(i).answer for i in range(10)]
    second = [data.example(i).answer for i in range(10, 20)]
    assert (
        sorted(first) == sorted(second) == sorted(str(i + 1) for i in range(10))
    )  # every record once an epoch
    assert first != second  # a new order each epoch
    again = Dataset(chat_file, messages="messages")  # a resumed run: the same prompts from any cursor
    assert [again.example(i).answer for i in range(13, 17)] == second[3:7]
    assert Dataset(chat_file, messages="messages", seed=1).example(0) != data.example(0) or first != [
        Dataset(chat_file, messages="messages", seed=1).example(i).answer for i in range(10)
    ]
    assert data.example(0).prompt[0]["role"] == "user"
    unshuffled = Dataset(chat_file, messages="messages", shuffle=False)
    assert [unshuffled.example(i).answer for i in range(3)] == ["1", "2", "3"]


def test_a_held_out_share_is_never_trained_on(chat_file, tmp_path):
    data = Dataset(chat_file, messages="messages", eval_fraction=0.3)
    trained = {data.example(i).answer for i in range(70)}
    held = {data.eval_example(i).answer for i in range(3)}
    assert trained == {str(i) for i in range(1, 8)} and held == {"8", "9", "10"}
    other = write_jsonl(
        tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "2+2"}], "answer": "4"}]
    )
    with_file = Dataset(chat_file, messages="messages", eval_path=other)
    assert with_file.eval_example(0).answer == "4"
    assert len({with_file.example(i).answer for i in range(10)}) == 10  # all of train.jsonl is trained on
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "2+2", "answer": "4"}])
    with pytest.raises(ValueError, match="wrong.jsonl, record 0: no column \\['messages'\\]"):
        Dataset(chat_file, messages="messages", eval_path=wrong)  # checked when the task is made


def test_csv_with_text_or_json_messages(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "chat", "solution"])
        w.writeheader()
        w.writerow(
            {
                "question": "1 plus 1",
                "chat": json.dumps([{"role": "user", "content": "1 plus 1"}]),
                "solution": "2",
            }
        )
    assert Dataset(str(path), prompt="question", answer="solution").example(0).prompt == "1 plus 1"
    assert (
        Dataset(str(path), messages="chat", answer="solution").example(0).prompt[0]["content"] == "1 plus 1"
    )


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        (None, {}, "does not exist"),
        ("", {}, "has no records"),
        ('{"q": "x", "answer": 1}\n', {}, "no column \\['prompt'\\] \\(it has \\['answer', 'q'\\]\\)"),
        ('{"prompt": "x", "answer": 1}\n', {"messages": "prompt"}, "is not a list of chat messages"),
        ("[1, 2]\n", {}, "expected a JSON object per line"),
        ('{"prompt": "x", "answer": 1}\n', {"eval_fraction": 1.5}, "must be in \\[0, 1\\)"),
    ],
)
def test_bad_files_and_columns_are_refused_with_the_fix(tmp_path, content, options, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Dataset(str(path), **options)


def test_a_data_set_task_needs_a_checkpoint_tokenizer(chat_file):
    from asyncflow.config import parse_config
    from asyncflow.errors import ConfigError
    from asyncflow.workflow.checks import check

    options = {"path": chat_file, "messages": "messages"}
    task = {
        "source": "asyncflow.tasks.dataset:Dataset",
        "options": options,
        "reward": "asyncflow.tasks.rewards:exact",
    }
    config = parse_config({"task": task})
    with pytest.raises(ConfigError, match="brings no symbols to build a tokenizer from; set model.path"):
        check(config)


def test_prompts_longer_than_the_limit_leave_the_index_and_are_counted(tmp_path):
    words = [1, 9, 2, 8, 3, 7, 4, 6, 5, 10]  # the last two are held out
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w " * n, "answer": n} for n in words])
    count = lambda prompt: len(prompt.split())  # noqa: E731  (the kind counts tokens, template applied)
    data = Dataset(path, eval_fraction=0.2)
    data.limit_prompts(count, room=5)
    epochs = [sorted(data.example(i).answer for i in range(e * 4, e * 4 + 4)) for e in range(3)]
    assert epochs == [["1", "2", "3", "4"]] * 3  # each kept prompt once an epoch, the long ones never
    assert {data.eval_example(i).answer for i in range(3)} == {"5"}
    assert data.dropped == {"train": 4, "eval": 1} and data.limit == 5
    again = Dataset(path, eval_fraction=0.2)  # a resumed run: the same prompt at every cursor
    again.limit_prompts(count, room=5)
    assert [again.example(i) for i in range(5, 11)] == [data.example(i) for i in range(5, 11)]

    configured = Dataset(path, max_prompt_tokens=3, shuffle=False)
    configured.limit_prompts(count, room=None)  # a checkpoint that gives no max positions
    assert [configured.example(i).answer for i in range(4)] == ["1", "2", "3", "1"]
    with pytest.raises(ValueError, match="max_prompt_tokens 3 is more than the 2 tokens the model leaves"):
        configured.limit_prompts(count, room=2)
    unlimited = Dataset(path)
    unlimited.limit_prompts(count, room=None)
    assert len({unlimited.example(i).answer for i in range(10)}) == 10 and unlimited.dropped == {}


def test_no_prompt_short_enough_is_refused_with_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w " * 9, "answer": 1}] * 3)
    data = Dataset(path)
    data.limit_prompts(lambda prompt: len(prompt.split()), room=5)
    message = (
        "all 3 train prompts of .* are longer than 5 tokens \\(the shortest has 9\\); the limit is the room"
    )
    with pytest.raises(ValueError, match=message + " the model leaves .* lower rollout.max_new_tokens"):
        data.example(0)


def chat_config(path: str, checkpoint: str, **rollout):
    from asyncflow.config import parse_config

    task = {
        "source": "asyncflow.tasks.dataset:Dataset",
        "options": {"path": path, "messages": "messages", "eval_fraction": 0.25},
        "reward": "asyncflow.tasks.rewards:exact",
    }  # fmt: skip
    return parse_config({"task": task, "model": {"path": checkpoint}, "rollout": rollout})


def test_the_run_drops_prompts_the_checkpoint_has_no_room_for_before_any_actor_starts(tmp_path, checkpoints):
    from asyncflow.errors import ConfigError
    from asyncflow.report import prompts_line
    from asyncflow.workflow.checks import check
    from workers.kinds import make_kind
    from workers.policy import make_task

    chat = lambda n: [{"role": "user", "content": "What is 1 plus 1? " * n}]  # noqa: E731
    records = [{"messages": chat(n), "answer": n} for n in (1, 40, 2, 3, 50, 4, 5, 60)]
    config = chat_config(write_jsonl(tmp_path / "d.jsonl", records), checkpoints["qwen2"], max_new_tokens=16)
    kind = make_kind(config, make_task(config.task, config.seed))
    lengths = [len(kind.prompt_ids(chat(n))) for n in (1, 40, 2, 3, 50, 4, 5, 60)]
    assert lengths[0] < 240 < min(lengths[1], lengths[4], lengths[7])  # 256 positions, 16 for the response
    report = check(config)
    assert report == {"max_prompt_tokens": 240, "prompts_dropped": {"train": 2, "eval": 1}}
    assert prompts_line(report) == "data set: prompts longer than 240 tokens dropped: 2 train, 1 eval"

    long_only = write_jsonl(tmp_path / "long.jsonl", [records[1], records[4], records[7]])
    with pytest.raises(ConfigError, match="all 3 train prompts of .*long.jsonl are longer than 240 tokens"):
        check(chat_config(long_only, checkpoints["qwen2"], max_new_tokens=16))
    with pytest.raises(
        ConfigError, match="rollout.max_new_tokens 256 leaves no room for a prompt in the model's 256"
    ):
        check(chat_config(long_only, checkpoints["qwen2"], max_new_tokens=256))


@pytest.mark.parametrize(
    ("reward", "response", "answer", "expected"),
    [
        (rewards.exact, " 42 ", "42", 1.0),
        (rewards.exact, "42.", "42", 0.0),
        (rewards.final_number, "3 + 4 = 7 #### 7", "7", 1.0),
        (rewards.final_number, "it is 1,000 #### 1,000", "#### 1000", 1.0),
        (rewards.final_number, "maybe 8", "7", 0.0),
        (rewards.final_number, "no number", "7", 0.0),
        (rewards.boxed, "so \\boxed{x + 1}", "x+1", 1.0),
        (rewards.math_verify, "The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        (rewards.math_verify, "#### 1,000", "1000", 1.0),
        (rewards.math_verify, "#### 3", "4", 0.0),
        (rewards.math_verify, "so 6 * 12 = 72. #### 72", "She makes 6 * 12 = 72 cups.\n#### 72", 1.0),
        (rewards.math_verify, "#### 70", "She makes 6 * 12 = 72 cups.\n#### 72", 0.0),
        (rewards.math_verify, "no answer here", "4", 0.0),
        (rewards.answer_format, "steps... #### 12", "", 1.0),
        (rewards.answer_format, "#### twelve", "", 0.0),
    ],
)
def test_text_rewards(reward, response, answer, expected):
    assert reward("q", response, answer) == expected


def test_a_user_template_makes_text_prompts_chat_messages(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "What is 2 plus 2?", "answer": "#### 4"}) + "\n")
    data = Dataset(str(path), prompt="question", user_template="{prompt} End with #### and the number.")
    assert data.example(0).prompt == [
        {"role": "user", "content": "What is 2 plus 2? End with #### and the number."}
    ]
    with pytest.raises(ValueError, match="must hold {prompt}"):
        Dataset(str(path), prompt="question", user_template="no placeholder")


def test_metadata_columns_travel_to_the_reward_as_info(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "2+2", "answer": "4", "level": 3, "unit": "apples"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    data = Dataset(str(tmp_path / "d.parquet"), metadata="level, unit")
    assert json.loads(data.example(0).info) == {"level": 3, "unit": "apples"}
    assert Dataset(str(tmp_path / "d.parquet")).example(0).info == ""
    with pytest.raises(ValueError, match="no column \\['grade'\\]"):
        Dataset(str(tmp_path / "d.parquet"), metadata="grade")


def test_a_regex_reward_extracts_with_the_users_pattern():
    reward = rewards.Regex(r"Answer:\s*(\S+)")
    assert reward("", "Answer: 3 ... no, Answer: 4", "4") == 1.0  # the last match counts
    assert reward("", "Answer: 5", "4") == 0.0 and reward("", "four", "4") == 0.0
    assert rewards.Regex(r"\d+")("", "7 then 12", "12") == 1.0  # no group: the whole match
    with pytest.raises(ValueError, match="not a regular expression"):
        rewards.Regex("(")
