"""`asyncflow export RUN_DIR OUT_DIR`: a run's trained policy as a Hugging Face directory.

The checkpoint's weights in the policy's architecture (LoRA adapters merged into the weights
they adapt), with its tokenizer (and chat template), saved with `save_pretrained`: transformers
and vLLM load it, and it gives the log-probs the trainer had. A run of a flow-matching policy
has no such format and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asyncflow.errors import ConfigError
from asyncflow.rundir import RunDir


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write the policy of checkpoint `step` (default: the newest whole one) of the run to `out_dir`."""
    from safetensors.torch import load_model

    from services.models import save_model
    from workers.kinds import make_kind
    from workers.policy import make_task
    from workers.trainable import make_trainable, plain_model

    run = RunDir.open(run_dir)
    config = run.config()
    if config.policy != "token":
        raise ConfigError(f"{run_dir} trained a {config.policy} policy; export writes language models only")
    if step is None:
        last = run.latest_checkpoint()
        if last is None:
            raise ConfigError(f"{run_dir} has no whole checkpoint to export; train until one is written")
        path = last[0]
    else:
        path = run.checkpoint_dir(step)
        if not (path / "state.json").is_file():
            raise ConfigError(
                f"{run_dir} has no checkpoint of step {step}; its checkpoints are {_steps(run)}"
            )
    kind = make_kind(config, make_task(config.task, config.seed))
    # the trainer's module as it saved it (with LoRA: the base wrapped by peft, adapters beside it)
    model: Any = make_trainable(kind.model(config.seed), config.trainer.trainable)
    load_model(model, str(path / "trainer" / "model.safetensors"))
    return save_model(plain_model(model), kind.tokenizer, out_dir)


def _steps(run: RunDir) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run.path / "checkpoints").glob("step_*"))
