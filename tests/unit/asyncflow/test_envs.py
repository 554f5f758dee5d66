"""Built-in environments and tools: the calculator, the Python sandbox (a call that loops, allocates
too much or opens a socket is killed or refused, and the episode records why), tool calls and the
gymnasium adapter."""

from __future__ import annotations

import string

import pytest

from asyncflow.envs import Example, episode_reward
from asyncflow.envs.arithmetic import Products, calculator_env
from asyncflow.envs.gym import GymEnv
from asyncflow.envs.sandbox import PythonTool
from asyncflow.envs.tools import Calculator, ToolEnv, ToolFailed, parse_call
from services.models import build_tokenizer
from services.serving import Completion, Request
from workers.episodes import EnvHost, EnvPool, Episodes


def test_the_calculator_computes_arithmetic_and_nothing_else():
    calc = Calculator(max_digits=20)
    assert calc.evaluate("123*456") == "56088"
    assert calc.evaluate(" 2*(3+4) - -1 ") == "15"
    assert calc.evaluate("7/2") == "3.5" and calc.evaluate("1.5*2") == "3"
    for bad, why in [("1/0", "division by zero"), ("__import__('os')", "not arithmetic"),
                     ("9**99", "more than 20 digits"), ("2 +", "not an arithmetic expression"),
                     ("True+1", "not arithmetic")]:  # fmt: skip
        with pytest.raises(ToolFailed, match=why):
            calc.evaluate(bad)


def test_a_tool_call_is_parsed_from_the_turn():
    assert parse_call("let me see <calc>1+2</calc> then") == ("calc", "1+2")
    assert parse_call("the answer is 3") is None
    assert parse_call("<calc>1+2</python>") is None  # the closing tag must name the same tool


async def test_the_tool_env_answers_calls_and_scores_the_final_answer():
    env = calculator_env()
    example = Products().example(3)
    assert await env.reset(example) == ""
    a, b = example.prompt[:-1].split("*")
    step = await env.step(f"<calc>{a}*{b}</calc>")
    assert step.observation == f"[{int(a) * int(b)}]" and not step.done
    assert (await env.step("<calc>1/0</calc>")).observation == "[?]"  # a failed call: the error format
    assert (await env.step("<sum>1</sum>")).info["tool_error"].startswith("no tool 'sum'")
    final = await env.step(example.answer)
    assert final.done and final.reward == {"correct": 1.0}
    assert (await env.step("12")).reward == {"correct": 0.0}


async def test_the_sandbox_runs_code_in_an_empty_environment_and_a_temporary_directory():
    out = await PythonTool().run(
        "import os\nprint(6 * 7, os.getcwd().startswith('/tmp'), 'HOME' in os.environ)"
    )
    assert out == "42 True False\n"


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("while True:\n    pass", "timeout: killed after 1 s"),
        ("x = bytearray(1 << 30)", "memory: MemoryError"),
        ("import socket\nsocket.socket()", "refused: refused in the sandbox: socket.__new__"),
        ("import subprocess\nsubprocess.run(['true'])", "refused: refused in the sandbox: subprocess.Popen"),
        ("import ctypes", "refused: refused in the sandbox: import"),
        ("raise ValueError('no')", "error: ValueError: no"),
    ],
)
async def test_the_sandbox_kills_or_refuses_and_says_why(code, why):
    with pytest.raises(ToolFailed) as failed:
        await PythonTool(timeout_s=1.0, memory_mb=128).run(code)
    assert str(failed.value).startswith(why)


async def test_an_episode_records_why_its_tool_was_killed():
    tok = build_tokenizer(list(string.printable))
    turns = iter(
        ["<python>while True: pass</python>", "<python>import socket; socket.socket()</python>", "done"]
    )

    async def scripted(requests):  # the model's turns, as token ids (the subject here is the tool)
        ids = [*tok.encode(next(turns)), tok.eos_token_id]
        return [Completion(r.request_id, 0, r.prompt_ids, ids, [0.0] * len(ids), [0] * len(ids), "stop")
                for r in requests]  # fmt: skip

    def sandboxed() -> ToolEnv:
        return ToolEnv([PythonTool(timeout_s=0.5)])

    episodes = Episodes(EnvPool([EnvHost(sandboxed)]), tok, [tok.eos_token_id], max_turns=4,
                        episode_timeout_s=20, max_episode_tokens=512)  # fmt: skip
    t = await episodes.run(scripted, Request("0", [1, 5]), 0, Example("x", "y"))
    assert t.episode["end"] == "done" and t.episode["turns"] == 3
    errors = [info.get("tool_error", "") for info in t.episode["info"]]
    assert errors[0] == "timeout: killed after 0.5 s"
    assert errors[1] == "refused: refused in the sandbox: socket.__new__"
    observation = [i for i, m in zip(t.response_ids, t.loss_mask) if not m]
    assert tok.decode(observation).startswith("error: timeout: killed after 0.5 s")


def test_episode_reward_is_the_environments_parts():
    episode = {"episode": {"reward": {"correct": 1.0, "format": 0.5}}}
    assert episode_reward("p", "r", "a", episode) == {"correct": 1.0, "format": 0.5}
    assert episode_reward("p", "r", "a", {"episode": {"reward": {}}}) == 0.0


async def test_a_gymnasium_environment_plays_as_text():
    env = GymEnv("FrozenLake-v1", make_options={"is_slippery": False, "map_name": "4x4"})
    assert await env.reset(Example("any", "")) == "0"
    assert (await env.step("go left?")).info["invalid_action"].startswith("expected an integer")
    path = [2, 2, 1, 1, 1, 2]  # right right down down down right: the goal of the 4x4 map
    steps = [await env.step(str(a)) for a in path]
    assert [s.observation for s in steps[:-1]] == ["1", "2", "6", "10", "14"]
    assert steps[-1].done and steps[-1].reward == {"env": 1.0}
    vector = GymEnv("CartPole-v1")
    first = await vector.reset(Example("any", ""))
    assert len(first.split()) == 4  # four numbers
    await vector.close()


async def test_environments_run_in_ray_actors(ray_session):
    from workers.episodes import RemoteEnvHost

    actor = ray_session.remote(EnvHost).remote("asyncflow.envs.arithmetic:calculator_env")
    pool = EnvPool([RemoteEnvHost(actor)])
    await pool.reset("e", Products().example(0))
    step = await pool.step("e", "<calc>6*7</calc>")
    assert step.observation == "[42]"
    await pool.close("e")
    assert await actor.live.remote() == 0


def test_the_env_section_refuses_what_cannot_run():
    from asyncflow.config import parse_config
    from asyncflow.errors import ConfigError

    with pytest.raises(ConfigError, match="env.source = 'nowhere:env'.*cannot import module 'nowhere'"):
        parse_config({"env": {"source": "nowhere:env"}})
    flow = {"policy": "flow", "task": {"source": "asyncflow.tasks.gaussians:EightGaussians",
            "reward": "asyncflow.tasks.gaussians:reward"}}  # fmt: skip
    with pytest.raises(ConfigError, match="multi-turn episodes of a language model.*unset env.source"):
        parse_config({**flow, "env": {"source": "asyncflow.envs.arithmetic:calculator_env"}})
    config = parse_config({"env": {"source": "asyncflow.envs.arithmetic:calculator_env", "max_turns": 3}})
    assert config.env.max_turns == 3
    long = {"source": "asyncflow.envs.arithmetic:calculator_env", "max_episode_tokens": 64}
    with pytest.raises(ConfigError, match="env.max_episode_tokens = 64 leaves no room.*max_positions = 64"):
        parse_config({"env": long, "model": {"max_positions": 64}})


def test_a_multi_turn_prompt_has_room_for_the_episode_not_one_turn():
    from asyncflow.config import ModelConfig, RolloutConfig
    from asyncflow.tasks.sorting import SortDigits
    from workers.kinds import TokenKind
    from workers.policy import make_tokenizer

    tokenizer, model = make_tokenizer(SortDigits()), ModelConfig(max_positions=64)
    rollout = RolloutConfig(max_new_tokens=8)
    assert TokenKind(tokenizer, model, rollout).prompt_room() == 56
    assert TokenKind(tokenizer, model, rollout, multi_turn=True, episode_tokens=48).prompt_room() == 16
    with pytest.raises(ValueError, match="env.max_episode_tokens 64 leaves no room"):
        TokenKind(tokenizer, model, rollout, multi_turn=True, episode_tokens=64).prompt_room()
