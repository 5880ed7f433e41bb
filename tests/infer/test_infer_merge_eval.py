"""tnlora merge (merged == base + adapter, official key names, loads with AutoModelForCausalLM) and
tnlora eval (per-token loss / perplexity equal to a float64 computation by hand)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tnlora.cli import main
from tnlora.infer.loading import load_for_inference

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
PROBE = torch.tensor([[3 + b for b in b"<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n"]])
OFFICIAL_KEY = re.compile(
    r"^(model\.embed_tokens\.weight|lm_head\.weight|model\.layers\.\d+\.token_mixer\.(qkvu_proj|out_proj)\.weight"
    r"|model\.layers\.0\.token_mixer\.lrpe\.theta|model\.layers\.\d+\.channel_mixer\.l[123]\.weight)$"
)

# Their references are CPU tensors: a GPU machine runs them as a CPU-only one (conftest.cpu_only).
pytestmark = pytest.mark.usefixtures("cpu_only")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


@pytest.fixture(scope="module")
def merged_dir(adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(out)]) == 0
    return out


def test_merged_model_equals_base_plus_adapter(adapter_dir, merged_dir):
    import tnlora  # noqa: F401  (registers the model with the Auto classes)

    with_adapter = load_for_inference(None, adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    torch.testing.assert_close(logits(merged), logits(with_adapter.model), rtol=1e-5, atol=1e-5)


def test_merged_checkpoint_layout(merged_dir, adapter_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja", "template.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    bad = [k for k in keys if not OFFICIAL_KEY.match(k)]
    assert not bad, bad
    assert "model.layers.1.channel_mixer.l3.weight" in keys
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["model_type"] == "transnormer"
    assert not [p for p in merged_dir.parent.iterdir() if p.name.startswith(".")]  # atomic: no temp dir left


def test_merged_tokenizer_chat_template_matches_the_training_template(merged_dir):
    import tnlora  # noqa: F401
    from tnlora.data.templates import Template

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    template = Template.load(merged_dir / "template.json")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a planet."}]  # fmt: skip
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.render_prompt(messages)


def test_merge_refuses_a_missing_adapter(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def _manual_loss(loaded, dataset: str, dataset_dir: str) -> tuple[float, int]:
    """Float64 cross-entropy over every supervised (shifted, unmasked) token, one example at a time."""
    from tnlora.data.encode import build_dataset
    from tnlora.data.readers import load_conversations

    convs = load_conversations(dataset, dataset_dir)[:10]
    examples, _ = build_dataset(convs, loaded.tokenizer, loaded.template, cutoff_len=256)
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            out = loaded.model(input_ids=ids).logits[0].double()
        targets = torch.tensor(ex.labels[1:])
        keep = targets != -100
        logp = torch.log_softmax(out[:-1], dim=-1)
        total += float(-logp[keep, targets[keep]].sum())
        count += int(keep.sum())
    return total / count, count


def test_eval_reports_the_per_token_loss_and_perplexity(adapter_dir, capsys):
    data_dir = str(Path(__file__).resolve().parents[2] / "examples" / "data")
    argv = ["eval", "--adapter", str(adapter_dir), "--dataset", "quickstart_alpaca", "--dataset_dir", data_dir]
    assert main([*argv, "--max_samples", "10", "--batch_size", "4"]) == 0
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"loss (\S+) \| ppl (\S+) \| tokens (\d+) \| examples 10", line)
    assert match, line
    loss, ppl, tokens = float(match[1]), float(match[2]), int(match[3])
    expected, count = _manual_loss(load_for_inference(None, adapter_dir), "quickstart_alpaca", data_dir)
    assert tokens == count
    assert loss == pytest.approx(expected, abs=2e-4)
    assert ppl == pytest.approx(math.exp(expected), rel=1e-3)


def test_a_merged_dir_chats_with_its_saved_template(merged_dir, adapter_dir, system_prompt):
    loaded = load_for_inference(str(merged_dir))
    assert loaded.adapter is None and loaded.template.default_system == system_prompt
    assert loaded.template == load_for_inference(None, adapter_dir).template


def test_merge_adapter_at_load_gives_the_exported_weights(adapter_dir, tmp_path):
    """load_for_inference(merge_adapter=True), the default of chat and generate: a plain model whose weights
    are those `tnlora merge` writes (bitwise in fp32), with the unmerged adapter's logits."""
    from peft import PeftModel

    from tnlora.model import TransnormerForCausalLM, load_model

    base = load_model("tiny").state_dict()  # the adapter's base, fp32
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["merge", "--adapter", str(adapter_dir), "--output", str(out), "--dtype", dtype]) == 0
        exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype)).state_dict()
        merged = load_for_inference(None, adapter_dir, dtype=dtype, merge_adapter=True).model
        assert type(merged) is TransnormerForCausalLM
        state = merged.state_dict()
        assert set(state) == set(exported)
        for name, tensor in state.items():
            # Values only: from_pretrained keeps lrpe.theta an fp32 parameter holding the saved bf16 values.
            tensor, want = tensor.float(), exported[name].float()
            if dtype == "float32":
                assert torch.equal(tensor, want), name
            else:
                # The preset base is fp32: loaded in bf16 it is rounded before the merge, the export only
                # after it (a bf16 checkpoint is the same either way): apart by the two roundings at most.
                bound = torch.finfo(torch.bfloat16).eps * (base[name].abs() + want.abs())
                assert ((tensor - want).abs() <= bound).all(), name
    unmerged = load_for_inference(None, adapter_dir)
    assert isinstance(unmerged.model, PeftModel)
    merged32 = load_for_inference(None, adapter_dir, merge_adapter=True).model
    torch.testing.assert_close(logits(merged32), logits(unmerged.model), rtol=1e-5, atol=1e-5)


def test_chat_and_generate_merge_by_default_eval_does_not():
    from tnlora.cli import build_parser

    parser = build_parser()
    base = ["--adapter", "a"]
    # None: merged unless the base is quantized (load_for_inference decides, once it knows)
    assert parser.parse_args(["chat", *base]).merge_adapter is None
    assert parser.parse_args(["generate", *base, "--prompts", "p", "--output", "o"]).merge_adapter is None
    assert parser.parse_args(["chat", *base, "--merge_adapter"]).merge_adapter is True
    assert parser.parse_args(["chat", *base, "--merge_adapter", "false"]).merge_adapter is False
    assert parser.parse_args(["eval", *base, "--dataset", "d"]).merge_adapter is False


def test_merge_adapter_at_load_folds_added_special_tokens_too(tmp_path):
    """An adapter with added tokens (peft trainable tokens on the tied embedding) merges at load as well."""
    from tnlora.config import load_run_config
    from tnlora.model import TransnormerForCausalLM
    from tnlora.train.run import train

    out = tmp_path / "out"
    cfg = load_run_config(None, [
        "--model_name_or_path", "tiny", "--dataset", "quickstart_chat", "--dataset_dir", str(EXAMPLE_DATA),
        "--template", "chatml", "--add_special_tokens", "<|im_start|>,<|im_end|>", "--cutoff_len", "512",
        "--output_dir", str(out), "--max_steps", "3", "--learning_rate", "1e-2", "--report_to", "none",
        "--plot_loss", "false",
    ])  # fmt: skip
    train(cfg)
    unmerged, merged = load_for_inference(None, out), load_for_inference(None, out, merge_adapter=True)
    assert type(merged.model) is TransnormerForCausalLM
    ids = merged.tokenizer("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] >= 259  # an added token: its embedding row was trained
    probe = torch.tensor([ids])
    with torch.no_grad():
        want, got = unmerged.model(input_ids=probe).logits, merged.model(input_ids=probe).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merge_never_writes_over_an_input_the_current_folder_or_a_users_folder(
    adapter_dir, tmp_path, capsys, monkeypatch
):
    adapter_before = _files(adapter_dir)
    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    cases = [
        (".", "error: --output: . is the current folder; name a new folder for the output\n"),
        (str(adapter_dir), f"error: --output: {adapter_dir} holds the adapter ({adapter_dir}); choose another folder"),
        (str(adapter_dir.parent), f"error: --output: {adapter_dir.parent} holds the adapter"),
        ("data", "error: --output: data is not empty and was not written by tnlora merge (it holds mine.json)"),
    ]
    for output, message in cases:
        for extra in ([], ["--overwrite"]):
            assert main(["merge", "--adapter", str(adapter_dir), "--output", output, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(message) and err.count("\n") == 1, err
    assert _files(adapter_dir) == adapter_before and _files(data) == {"mine.json": b"[]"}


def test_merge_replaces_only_an_earlier_merge_and_only_with_overwrite(adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", "--adapter", str(adapter_dir), "--output", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "tnlora_output.json").read_text())["verb"] == "merge"
    first = _files(out)
    assert main(argv) == 2
    assert f"--output: {out} holds an earlier tnlora merge output; pass --overwrite to replace it" in capsys.readouterr().err
    (out / "notes.md").write_text("mine")
    assert main([*argv, "--overwrite"]) == 2
    assert "holds files tnlora did not write (notes.md)" in capsys.readouterr().err
    assert _files(out) == {**first, "notes.md": b"mine"}
    (out / "notes.md").unlink()
    assert main([*argv, "--overwrite", "--dtype", "bfloat16"]) == 0
    assert _files(out).keys() == first.keys() and _files(out) != first


def test_merged_config_names_no_remote_code(tiny_official_dir, tmp_path):
    """The official config.json's auto_map names .py files a merged directory does not contain."""
    from tnlora.config import load_run_config
    from tnlora.train.run import train

    assert "auto_map" in json.loads((tiny_official_dir / "config.json").read_text())
    cfg = load_run_config(None, [
        "--model_name_or_path", str(tiny_official_dir), "--dataset", "quickstart_chat", "--dataset_dir", str(EXAMPLE_DATA),
        "--template", "chatml", "--cutoff_len", "256", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--report_to", "none", "--plot_loss", "false", "--max_samples", "2",
    ])  # fmt: skip
    train(cfg)
    assert main(["merge", "--adapter", str(tmp_path / "out"), "--output", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "transnormer"
    assert not list((tmp_path / "m").glob("*.py"))


def test_eval_output_is_written_and_replaced_only_when_it_is_an_eval_output(adapter_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--adapter", str(adapter_dir), "--dataset", "quickstart_alpaca", "--dataset_dir",
            str(EXAMPLE_DATA), "--max_samples", "4", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    metrics = json.loads(out.read_text())
    assert line.startswith(f"loss {metrics['eval_loss']:.4f} | ppl {metrics['eval_ppl']:.3f}")
    assert metrics["eval_examples"] == 4 and metrics["adapter"] == str(adapter_dir)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: --output: {out} exists; pass --overwrite to replace it\n"
    assert main([*argv, "--overwrite"]) == 0
    mine = tmp_path / "mine.json"
    mine.write_text('{"a": 1}')
    assert main([*argv[:-1], str(mine), "--overwrite"]) == 2
    assert "is not evaluation metrics (JSON) written by tnlora" in capsys.readouterr().err
    assert mine.read_text() == '{"a": 1}'
