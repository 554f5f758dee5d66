"""The config tree: strict, documented, bounded, with errors that name field, value and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncflow.config import AsyncFlowConfig, Section, load_config, parse_config
from asyncflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_validate():
    config = parse_config({})
    assert config.dataplane.backend == "memory" and config.dataplane.num_storage_units == 2


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataplane:\n  lease_s: 5\n")
    config = load_config(path, ["dataplane.num_storage_units=4", "run_name=exp1"])
    assert config.dataplane.num_storage_units == 4 and config.dataplane.lease_s == 5.0
    assert config.run_name == "exp1"


def test_errors_name_every_bad_field_with_value_and_fix():
    with pytest.raises(ConfigError) as info:
        parse_config({"seed": -1, "dataplane": {"num_storage_units": 0, "lese_s": 3}}, source="run.yaml")
    text = str(info.value)
    assert "3 invalid setting(s)" in text
    assert "dataplane.num_storage_units = 0" in text and "greater than or equal to 1" in text
    assert "--set dataplane.num_storage_units=" in text
    assert "dataplane.lese_s: unknown field" in text
    assert "seed = -1" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [("dataplane: [", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping")],
)
def test_malformed_files_are_refused_clearly(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(ROOT / "examples" / "dataplane.yaml", ["no-equals-sign"])


def test_every_field_has_a_description_and_sections_are_strict():
    def walk(model: type[Section]):
        assert model.model_config["extra"] == "forbid" and model.model_config["frozen"]
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
                walk(field.annotation)

    walk(AsyncFlowConfig)


def test_importing_config_pulls_in_no_torch_ray_or_vllm():
    code = (
        "import sys, asyncflow.config, asyncflow.errors; "
        "print(sorted(m for m in ('torch', 'ray', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rl_sections_check_their_values_and_each_other():
    from asyncflow.config import parse_config
    from asyncflow.errors import ConfigError

    config = parse_config({"mode": "sync", "staleness": 0, "trainer": {"estimator": "rloo"}})
    assert config.mode == "sync" and config.trainer.estimator == "rloo"
    with pytest.raises(ConfigError, match="head size 24"):
        parse_config({"model": {"hidden_size": 48, "num_heads": 2}})
    with pytest.raises(ConfigError, match="reference.enabled: true"):
        parse_config({"trainer": {"kl_coef": 0.1}})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        parse_config({"task": {"reward": "no_such_module:score"}})
    with pytest.raises(ConfigError, match="not of the form 'package.module:attribute'"):
        parse_config({"task": {"source": "asyncflow.tasks.sorting.SortDigits"}})
    with pytest.raises(ConfigError, match="staleness"):
        parse_config({"staleness": -1})
    with pytest.raises(ConfigError, match="cannot hold one training batch"):
        parse_config({"dataplane": {"capacity_rows": 100}, "trainer": {"batch_prompts": 16}})
    with pytest.raises(ConfigError, match="partial_rollout=abort needs rollout.engine=vllm"):
        parse_config({"rollout": {"partial_rollout": "abort"}})
    with pytest.raises(ConfigError, match="rollout.autocast='bfloat16' is for the torch engines.*vllm.dtype"):
        parse_config({"rollout": {"engine": "vllm", "autocast": "bfloat16"}})
    flow = {"policy": "flow", "task": {"source": "asyncflow.tasks.gaussians:EightGaussians"}}
    with pytest.raises(ConfigError, match="rollout.autocast = 'bfloat16' is for token policies"):
        parse_config({**flow, "rollout": {"autocast": "bfloat16"}})
    with pytest.raises(
        ConfigError, match=r"trainer.autocast = 'bfloat16' is for token policies.*autocast: off"
    ):
        parse_config({**flow, "trainer": {"autocast": "bfloat16"}})
    with pytest.raises(ConfigError, match="trainer.logprob_chunk_tokens = 256 applies to a token policy"):
        parse_config({**flow, "trainer": {"logprob_chunk_tokens": 256}})
    with pytest.raises(ConfigError, match="trainer.gradient_checkpointing = True applies to a token policy"):
        parse_config({**flow, "trainer": {"gradient_checkpointing": True}})
    memory = parse_config({"trainer": {"logprob_chunk_tokens": 256, "gradient_checkpointing": True}})
    assert memory.trainer.logprob_chunk_tokens == 256 and memory.trainer.gradient_checkpointing
    with pytest.raises(ConfigError, match="logprob_vocab_shards = 4 applies to a token policy"):
        parse_config({**flow, "trainer": {"logprob_vocab_shards": 4}})
    for sampler in ({"top_k": 50}, {"top_p": 0.9}):  # a truncation needs the whole vocabulary row
        with pytest.raises(ConfigError, match="logprob_vocab_shards = 4 merges pieces.*whole vocabulary row"):
            parse_config({"trainer": {"logprob_vocab_shards": 4}, "rollout": sampler})
    with pytest.raises(ConfigError, match="logprob_vocab_shards"):
        parse_config({"trainer": {"logprob_vocab_shards": 0}})
    assert parse_config({"trainer": {"logprob_vocab_shards": 4}}).trainer.logprob_vocab_shards == 4
    vllm = parse_config(
        {"rollout": {"engine": "vllm", "partial_rollout": "abort", "vllm": {"kv_cache_gib": 1}}}
    )
    assert vllm.rollout.vllm.kv_cache_gib == 1


def test_every_shipped_example_validates():
    from pathlib import Path

    from asyncflow.config import load_config

    examples = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        load_config(path)


def test_an_override_that_is_not_yaml_names_the_value_and_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: x\n")
    with pytest.raises(ConfigError, match=r"override 'trainer.steps=\[1': the value '\[1' is not valid YAML"):
        load_config(path, ["trainer.steps=[1"])


def test_task_options_are_checked_against_the_task_at_load():
    with pytest.raises(ConfigError, match=r"task.options \['max_digit'\] are not arguments of .*SortDigits"):
        parse_config({"task": {"options": {"max_digit": 5}}})
    assert parse_config({"task": {"options": {"max_digits": 6}}}).task.options == {"max_digits": 6}


def test_trainable_is_all_lora_or_patterns_and_says_so_when_it_is_neither(tmp_path):
    from asyncflow.config import Lora, LoraConfig, Patterns

    assert parse_config({}).trainer.trainable == "all"
    lora = parse_config(
        {"trainer": {"trainable": {"lora": {"rank": 4, "targets": ["q_proj"]}}}}
    ).trainer.trainable
    assert lora == Lora(lora=LoraConfig(rank=4, targets=("q_proj",)))
    assert lora.lora.alpha == 16 and lora.lora.dropout == 0
    patterns = parse_config({"trainer": {"trainable": {"patterns": ["model.layers.1.*"]}}}).trainer.trainable
    assert patterns == Patterns(patterns=("model.layers.1.*",))
    path = tmp_path / "c.yaml"
    path.write_text("run_name: x\n")
    config = load_config(path, ["trainer.trainable={lora: {rank: 2, alpha: 4}}"])
    assert isinstance(config.trainer.trainable, Lora) and config.trainer.trainable.lora.rank == 2
    assert AsyncFlowConfig.model_validate(config.public()) == config  # a run directory's config reloads
    for bad in ("some", {"pattern": ["x"]}, {"lora": {}, "patterns": ["x"]}):
        with pytest.raises(ConfigError, match=r"trainer.trainable.*expected all, \{lora: .*\} or \{patterns"):
            parse_config({"trainer": {"trainable": bad}})
    with pytest.raises(ConfigError, match="rank"):
        parse_config({"trainer": {"trainable": {"lora": {"rank": 0}}}})
    with pytest.raises(ConfigError, match="patterns"):
        parse_config({"trainer": {"trainable": {"patterns": []}}})
    with pytest.raises(ConfigError, match="a flow policy trains all of its parameters or"):
        parse_config({"policy": "flow", "task": {"source": "asyncflow.tasks.gaussians:EightGaussians"},
                      "trainer": {"trainable": {"lora": {}}}})  # fmt: skip
    for section in (Lora, LoraConfig, Patterns):  # the walk above does not enter the union
        assert all(f.description for f in section.model_fields.values()), section


def test_an_afm_run_needs_a_flow_policy_and_enough_cem_samples():
    flow = {"policy": "flow", "task": {"source": "asyncflow.tasks.robot:PointRobotTask"}}
    assert parse_config({**flow, "flow": {"afm": {"duration_s": 5}}}).flow.afm.duration_s == 5
    with pytest.raises(ConfigError, match=r"flow.afm is set .* but policy = 'token'"):
        parse_config({"flow": {"afm": {}}})
    with pytest.raises(ConfigError, match=r"flow.afm.elites = 80 exceeds flow.afm.population = 64"):
        parse_config({**flow, "flow": {"afm": {"elites": 80}}})
