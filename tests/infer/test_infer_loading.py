"""tnlora.infer.loading: the base, tokenizer and template come from the run dir; checkpoints load too."""

from __future__ import annotations

import pytest
import torch

from tnlora.errors import TnloraError
from tnlora.infer.loading import load_for_inference, run_dir_of

PROBE = torch.tensor([[3 + b for b in b"<|im_start|>user\nHi<|im_end|>\n"]])


def test_a_checkpoint_loads_with_its_run_files(adapter_dir):
    checkpoint = adapter_dir / "checkpoint-30"
    assert run_dir_of(checkpoint) == adapter_dir
    final, ckpt = load_for_inference(None, adapter_dir), load_for_inference(None, checkpoint)
    assert ckpt.base == "tiny" and ckpt.template == final.template
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(input_ids=PROBE).logits, final.model(input_ids=PROBE).logits)


def test_overrides_and_refusals(adapter_dir, capsys):
    loaded = load_for_inference("tiny", adapter_dir, template="alpaca", system="S")
    assert loaded.template.name == "alpaca" and loaded.system == "S"
    assert "differs from the template the adapter was trained with" in capsys.readouterr().err
    with pytest.raises(TnloraError, match="--template: unknown template 'nope'"):
        load_for_inference("tiny", None, template="nope")
    with pytest.raises(TnloraError, match="--model: required"):
        load_for_inference(None, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(TnloraError, match="--device: CUDA requested but no GPU is available"):
        load_for_inference("tiny", None, device="cuda")
