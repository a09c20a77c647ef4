"""The side-by-side table of results files."""

import json

from utils.compare import comparison_table, main


def _write(path, acc, ppl, quant):
    path.write_text(json.dumps({"results": {"piqa": {"acc,none": acc},
                                            "lambada_openai": {"acc,none": 0.5, "perplexity,none": ppl}},
                                "quantization": quant}))
    return path


def test_table_columns_rows_and_mean(tmp_path):
    fp = _write(tmp_path / "fp.json", 0.7, 20.0, {"quant_config": None})
    fpq = _write(tmp_path / "fpq.json", 0.6, 80.5, {"quant_config": {"name": "FPQ_config_llama"},
                                                     "qbits": [4, 4, 4, 2, 2, 2], "search": {"sequential": True}})
    lines = comparison_table([fp, fpq]).splitlines()
    assert lines[0] == "| task | full precision | FPQ W4A4E4 sequential |"
    assert "| piqa | 70.00 | 60.00 |" in lines
    assert "| lambada_openai ppl | 20.00 | 80.50 |" in lines
    assert lines[-1] == "| mean accuracy | 60.00 | 55.00 |"


def test_missing_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such results file: {tmp_path / 'nope.json'}"
