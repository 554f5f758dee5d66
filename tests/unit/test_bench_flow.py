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
