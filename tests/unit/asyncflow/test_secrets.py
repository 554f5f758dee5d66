"""A Redis password never reaches disk or output: not the run directory, `validate`, nor an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncflow.config import load_config, parse_config
from asyncflow.errors import ConfigError
from asyncflow.rundir import RunDir
from dataplane.config import RUN_PASSWORD_ENV, RedisConfig, redact_url
from dataplane.redis.connection import server_url

ROOT = Path(__file__).resolve().parents[3]
PASSWORDS = ["plain-pw", "with#hash", "with/slash", "with?query", "with@at", "a:b#c/d?e@f"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_redact_url_hides_any_password(password):
    for url in (f"redis://user:{password}@host:6380/0", f"rediss://:{password}@host:6380/0#asyncflow:run"):
        shown = redact_url(url)
        assert password not in shown and "host:6380" in shown and "***" in shown


def config_with(password: str, **extra) -> dict:
    return {
        "dataplane": {"backend": "redis", "redis": {"url": f"redis://trainer:{password}@h:6379/0"}},
        **extra,
    }


@pytest.mark.parametrize("password", ["with#hash", "with/slash", "with?query", "a:b#c/d?e@f"])
def test_a_password_that_breaks_the_url_is_refused_without_echoing_it(password):
    with pytest.raises(ConfigError, match="percent-encode") as info:
        parse_config(config_with(password))
    assert password not in str(info.value)


@pytest.mark.parametrize("password", ["plain-pw", "with@at", "per%23cent"])
def test_a_rule_across_fields_does_not_echo_the_config(password):
    with pytest.raises(ConfigError) as info:  # kl_coef needs a reference: an error of the whole config
        parse_config(config_with(password, trainer={"kl_coef": 0.1}))
    assert "kl_coef" in str(info.value) and password not in str(info.value)
    with pytest.raises(ConfigError) as info:  # a rule of the redis section: two passwords
        parse_config({"dataplane": {"redis": {"url": f"redis://:{password}@h:6379/0", "password_env": "PW"}}})
    assert "keep one of them" in str(info.value) and password not in str(info.value)


def test_the_run_directory_keeps_a_reference_and_resume_reads_the_environment(tmp_path, monkeypatch):
    config = parse_config(config_with("s3cret%231", output_dir=str(tmp_path)))
    run = RunDir.create(config)
    text = run.config_path.read_text()
    assert "s3cret" not in text
    saved = yaml.safe_load(text)["dataplane"]["redis"]
    assert saved["url"] == "redis://trainer@h:6379/0" and saved["password_env"] == RUN_PASSWORD_ENV
    resumed = run.config()
    monkeypatch.delenv(RUN_PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{RUN_PASSWORD_ENV}.*export it under that name before --resume"):
        server_url(resumed.dataplane.redis)
    monkeypatch.setenv(RUN_PASSWORD_ENV, "s3cret#1")
    assert server_url(resumed.dataplane.redis) == "redis://trainer:s3cret%231@h:6379/0"
    assert server_url(config.dataplane.redis) == str(config.dataplane.redis.url)  # the live run: unchanged


def test_validate_prints_no_password(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_with("pw%2Fwith%3Fodd%23chars@x")))
    out = subprocess.run(
        [sys.executable, "-m", "asyncflow.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "pw%2F" not in out.stdout + out.stderr and "chars@x" not in out.stdout + out.stderr
    assert load_config(path).dataplane.redis.url.endswith("chars@x@h:6379/0")  # the run itself has it


def test_a_public_section_without_a_password_is_unchanged():
    rc = RedisConfig(url="redis://h:6379/0", password_env="PW")
    assert rc.public() == rc.model_dump(mode="json")
