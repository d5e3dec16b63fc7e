"""lmmrl-parity end to end on a tiny checkpoint, and its verdict on outputs that differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmmrl_megatron.cli.parity import main
from lmmrl_megatron.models.qwen_vl.parity import ParityOutputs, build_parity_batch, compare
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("parity") / "ckpt",
                                overrides=["text_config.vocab_size=500"])


def test_cli_passes_at_tp2_and_prints_the_differences(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf", str(tiny), "--tp", "2", "--pp", "1", "--packed"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert "logits:    max abs" in out and "log-probs: max abs" in out and out.rstrip().endswith("PASS")
    log_prob_line = next(line for line in out.splitlines() if line.startswith("log-probs"))
    assert float(log_prob_line.split()[3]) < 1e-4


def test_verdict_fails_on_a_perturbed_log_prob(tiny: Path) -> None:
    batch = build_parity_batch(tiny)
    vocab = 500
    logits = torch.randn(*batch.input_ids.shape, vocab)
    reference = ParityOutputs(logits=logits, log_probs=torch.log_softmax(logits, -1)[..., 0])
    same = compare(ParityOutputs(logits.clone(), reference.log_probs.clone()), reference, batch)
    assert same.within("fp32") and same.max_abs_logits == 0
    shifted = reference.log_probs.clone()
    real = torch.nonzero((batch.attention_mask != 0) & (batch.labels >= 0))[5]
    shifted[real[0], real[1]] += 1e-3
    report = compare(ParityOutputs(logits, shifted), reference, batch)
    assert report.max_abs_log_probs == pytest.approx(1e-3, rel=1e-2) and not report.within("fp32")
    assert report.within("bf16")
    padding = torch.nonzero(batch.attention_mask == 0)[0]
    shifted_at_padding = reference.log_probs.clone()
    shifted_at_padding[padding[0], padding[1]] += 10.0
    assert compare(ParityOutputs(logits, shifted_at_padding), reference, batch).within("fp32")


def test_bad_arguments_exit_2(tiny: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf", str(tiny), "--tp", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf", str(tiny.parent / "missing")])
    assert exit_info.value.code == 2
