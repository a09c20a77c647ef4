"""How evaluation hands --batch_size to lm-eval (without running lm-eval)."""

import torch

from utils.report import evaluation

NOTE = "--batch_size auto on CPU: using 8 (lm-eval's probe takes minutes here); pass an integer to choose\n"


def test_auto_on_cpu_is_a_fixed_batch_size_said_once(capsys):
    from utils.report.evaluation import resolve_batch_size

    assert resolve_batch_size("auto", "cpu") == 8
    assert capsys.readouterr().err == NOTE
    assert resolve_batch_size("auto", torch.device("cuda", 1)) == "auto"  # a GPU: lm-eval probes
    assert resolve_batch_size("16", "cpu") == 16 and resolve_batch_size("4", "cuda:0") == 4
    assert capsys.readouterr().err == ""


def test_evaluate_gives_hflm_the_resolved_batch_size(monkeypatch, capsys):
    import lm_eval
    import lm_eval.models.huggingface

    seen = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen["batch_size"] = batch_size

    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", FakeHFLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: {"results": {}, "samples": []})
    results = evaluation.evaluate(torch.nn.Linear(2, 2), None, [], batch_size="auto", num_fewshot=0, limit=None,
                                  seed=0)
    assert seen["batch_size"] == 8 and results == {"results": {}}
    assert capsys.readouterr().err == NOTE
