"""benchmarks/flow.py's PMRF and PFGM++ tables run end to end at toy size and write their figures."""

from __future__ import annotations

import json

import torch

from benchmarks.flow import main


def test_pmrf_and_pfgm_tables_run_at_toy_size(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "flow.json"
    try:
        toy = ["--digits-iters", "20", "--pfgm-iters-2d", "20", "--pfgm-points", "200"]
        main(
            ["--only", "pmrf,pfgm", *toy, "--degradations", "mask", "--aug-dims", "8,inf", "--json", str(out)]
        )
    finally:
        torch.set_num_threads(before)
    figures = json.loads(out.read_text())
    pmrf = figures["pmrf"]["median"]
    assert set(pmrf) == {"mask/mmse-0"} | {f"mask/{m}-{k}" for m in ("posterior", "from-y", "pmrf")
                                           for k in (1, 2, 5, 10, 50)}  # fmt: skip
    assert all(cell["mse"] > 0 and cell["fd"] > 0 and 0 <= cell["acc"] <= 1 for cell in pmrf.values())
    for table in ("2d", "digits"):
        rows = figures["pfgm"][table]["median"]
        assert set(rows) == {"8", "inf (Gaussian)"} and all(len(r) == 7 for r in rows.values())
    printed = capsys.readouterr().out
    assert "| mask | pmrf |" in printed and "PFGM++ on 8x8 digits" in printed


def test_encoder_table_runs_at_toy_size(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "encoder.json"
    try:
        toy = ["--digits-iters", "5", "--encoder-sup-s", "0.2", "--encoder-rl-s", "0.5"]
        main(["--only", "encoder", *toy, "--json", str(out)])
    finally:
        torch.set_num_threads(before)
    figures = json.loads(out.read_text())["encoder"]
    rows = figures["median"]
    assert set(rows) == {"backbone", "encoder/supervised", "encoder/rl", "full/supervised", "full/rl"}
    run = figures["runs"][0]
    # only the encoder's tensors move in the encoder arm: a fraction of the full model's bytes
    assert 0 < run["encoder"]["bytes_per_update"] < run["full"]["bytes_per_update"] / 4
    assert run["encoder"]["trained_parameters"] < run["full"]["trained_parameters"] / 4
    assert all(0 <= r["agreement"] <= 1 and r["fd"] > 0 for r in rows.values())
    assert "| encoder | rl |" in capsys.readouterr().out
