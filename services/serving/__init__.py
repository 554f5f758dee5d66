"""Rollout engines behind one protocol: requests of token ids in, completions with
behaviour log-probs and per-token policy versions out.

The torch engine lives in `services.serving.torch_engine` (import it where you build one;
this package stays importable without loading a model library)."""

from services.serving.protocol import Completion, Engine, FinishReason, Request, SamplingParams, check_fits

__all__ = ["Completion", "Engine", "FinishReason", "Request", "SamplingParams", "check_fits"]
