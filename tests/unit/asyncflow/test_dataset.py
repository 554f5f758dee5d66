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
    from asyncflow.workflow.pipeline import check

    options = {"path": chat_file, "messages": "messages"}
    task = {
        "source": "asyncflow.tasks.dataset:Dataset",
        "options": options,
        "reward": "asyncflow.tasks.rewards:exact",
    }
    config = parse_config({"task": task})
    with pytest.raises(ConfigError, match="brings no symbols to build a tokenizer from; set model.path"):
        check(config)


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
        (rewards.math_verify, "no answer here", "4", 0.0),
        (rewards.answer_format, "steps... #### 12", "", 1.0),
        (rewards.answer_format, "#### twelve", "", 0.0),
    ],
)
def test_text_rewards(reward, response, answer, expected):
    assert reward("q", response, answer) == expected
