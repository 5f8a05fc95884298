"""The mutation check (scripts/mutation_check.py): every chosen break of the SepLLM rule and of the kernel's CPU
twins makes the mask tests fail, and a change the tests cannot see is reported as surviving."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation_check.py"


def load():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutation_is_caught(capsys):
    assert load().main([]) == 0, capsys.readouterr().out


def test_a_harmless_change_is_reported_as_surviving(monkeypatch, capsys):
    check = load()
    monkeypatch.setattr(check, "TESTS", ["tests/sepllm/test_rule.py::test_bipe_known_values"])
    monkeypatch.setattr(check, "MUTATIONS", [("megatron/model/sepllm/rule.py", "KV retention and attention-map density",
                                              "KV retention and attention-map density (edited)", "a comment")])
    assert check.main([]) == 1
    assert "SURVIVED megatron/model/sepllm/rule.py: a comment" in capsys.readouterr().out
