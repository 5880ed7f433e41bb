"""tnlora.train.run end to end on the tiny preset: loss falls, the output dir is standard and reloads,
resume equals an uninterrupted run, the loss is per token under gradient accumulation and packing."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import StopAtStep
from transformers import TrainerCallback

from tnlora.cli import main
from tnlora.data.collate import TrainingCollator
from tnlora.model import load_model
from tnlora.train.run import build_datasets, build_model, build_tokenizer, train
from tnlora.train.trainer import build_trainer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROBE = torch.tensor([[3 + b for b in b"<|im_start|>user\nWho are you?<|im_end|>\n"]])


def logits(model, ids: torch.Tensor = PROBE) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


TRAINED_ARGS = (
    "--max_steps", "24",
    "--save_steps", "12",
    "--val_size", "6",
    "--eval_steps", "12",
    "--report_to", "tensorboard",
    "--plot_loss", "true",
    "--lora_dropout", "0.1",
)  # fmt: skip
SAMPLE_PROMPTS = ["Who are you?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_config, one_thread):
    """One 24-step LoRA run with eval, checkpoints, tensorboard, the loss plot and sample replies."""
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = make_config(out, *TRAINED_ARGS, "--sample_prompts", json.dumps(SAMPLE_PROMPTS),
                      "--sample_max_new_tokens", "8")  # fmt: skip
    with one_thread():
        return train(cfg)


def test_loss_falls(trained):
    losses = [e["loss"] for e in trained.log_history if "loss" in e]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.3
    assert math.isfinite(trained.metrics["eval_loss"])
    assert trained.metrics["eval_ppl"] == pytest.approx(math.exp(trained.metrics["eval_loss"]))


def test_output_dir_has_the_standard_layout(trained):
    out = trained.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "tnlora_run.yaml",
        "template.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "loss.png",
        "checkpoint-12/adapter_model.safetensors",
        "checkpoint-24/optimizer.pt",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no tensorboard event file"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"qkvu_proj", "out_proj", "l1", "l2", "l3"}
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16 and adapter["lora_dropout"] == 0.1
    # the saved run config is the resolved one (CPU: fp32, no packing)
    run = (out / "tnlora_run.yaml").read_text()
    assert "bf16: false" in run and "packing: false" in run and "lora_alpha: 16.0" in run
    assert json.loads((out / "template.json").read_text())["name"] == "chatml"
    assert trained.trainable_params == 16_384  # 2 layers × r 8 × Σ(in + out) of the five linears


def test_saved_adapter_reproduces_the_trained_logits(trained):
    from peft import PeftModel

    from tnlora.infer.loading import load_for_inference

    expected = logits(trained.model)
    assert not torch.allclose(expected, logits(load_model("tiny")), atol=1e-3)  # training changed something
    reloaded = PeftModel.from_pretrained(load_model("tiny"), str(trained.output_dir))
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    ours = load_for_inference(None, trained.output_dir)
    assert ours.template.name == "chatml" and ours.base == "tiny"
    torch.testing.assert_close(logits(ours.model), expected, rtol=1e-5, atol=1e-5)


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("packing", ["false", "true"])
def test_resume_after_interruption_equals_an_uninterrupted_run(make_config, tmp_path, packing):
    # lora_dropout > 0: resuming must restore the RNG too, not only weights, optimizer and data position
    args = ("--max_steps", "6", "--save_steps", "3", "--lora_dropout", "0.1", "--packing", packing)
    args += ("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    whole = train(make_config(tmp_path / "whole", *args))
    cut = make_config(tmp_path / "cut", *args)
    first = train(cut, callbacks=[StopAtStep(3)])
    assert first.global_step == 3 and (tmp_path / "cut" / "checkpoint-3").is_dir()
    resumed = train(make_config(tmp_path / "cut", *args, "--resume_from_checkpoint", "true"))
    assert resumed.global_step == 6
    a, b = _adapter_tensors(whole.output_dir), _adapter_tensors(resumed.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # and the weights did move between step 3 and step 6
    mid = _adapter_tensors(tmp_path / "cut" / "checkpoint-3")
    assert any(not torch.allclose(mid[k], a[k]) for k in a)


class GradCapture(TrainerCallback):
    """Copies every trainable gradient just before the (only) optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step_grads(make_config, out: Path, batch: int, accumulation: int, data) -> dict[str, torch.Tensor]:
    cfg = make_config(
        out,
        "--max_steps", "1",
        "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", str(accumulation),
        "--max_grad_norm", "0",
        "--max_samples", "2",
    )  # fmt: skip
    from tnlora.config import resolve_defaults

    cfg = resolve_defaults(cfg, cuda=False, cuda_bf16=False)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    # B = 0 at init makes A's gradient zero; start from a non-trivial adapter so every LoRA grad counts
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    capture = GradCapture()
    trainer = build_trainer(cfg, model, tokenizer, data, callbacks=[capture])
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    return capture.grads


def test_gradient_accumulation_gives_the_full_batch_gradient(make_config, tmp_path):
    from tnlora.config import resolve_defaults

    cfg = resolve_defaults(make_config(tmp_path / "d", "--max_samples", "2"), cuda=False, cuda_bf16=False)
    data = build_datasets(cfg, build_tokenizer(cfg))
    learned = [sum(label != -100 for label in row["labels"][1:]) for row in data.train]
    assert len(learned) == 2 and learned[0] != learned[1]  # unequal lengths: mean-of-means would differ
    full = _one_step_grads(make_config, tmp_path / "full", 2, 1, data)
    accumulated = _one_step_grads(make_config, tmp_path / "acc", 1, 2, data)
    assert full.keys() == accumulated.keys() and len(full) == 20
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-7, msg=name)


def test_packed_rows_give_the_same_loss_as_padded_examples(make_config, tmp_path):
    from tnlora.config import resolve_defaults

    def config(*extra: str):
        return resolve_defaults(
            make_config(tmp_path / "p", "--max_samples", "12", "--cutoff_len", "600", *extra), cuda=False, cuda_bf16=False
        )

    tokenizer = build_tokenizer(config())
    padded = build_datasets(config(), tokenizer)
    packed = build_datasets(config("--packing", "true"), tokenizer)
    assert len(packed.train) < len(padded.train)
    model = load_model("tiny")

    def summed_loss(bundle) -> tuple[float, int]:
        batch = bundle.collator(list(bundle.train))
        count = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            out = model(**batch, num_items_in_batch=1)
        return float(out.loss), count

    loss_padded, n_padded = summed_loss(padded)
    loss_packed, n_packed = summed_loss(packed)
    assert n_packed == n_padded > 0
    assert loss_packed == pytest.approx(loss_padded, rel=1e-4)


def test_collator_masks_row_starts_and_packed_example_starts():
    class Inner:
        def __call__(self, features):
            return {
                "input_ids": torch.tensor([[5, 6, 7, 8, 9]]),
                "labels": torch.tensor([[5, 6, 7, 8, 9]]),
                "attention_mask": torch.ones(1, 5, dtype=torch.long),
                "seq_ids": torch.tensor([[0, 0, 1, 1, 1]]),
            }

    batch = TrainingCollator(Inner())([{"input_ids": [1], "seq_ids": [0], "length": 1}])
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9]]
    # Host-side counts, so that neither the loss nor the Trainer reads them back from the GPU.
    assert batch["num_loss_tokens"] == 3 and batch["num_real_tokens"] == 5
    assert "seq_ids" not in batch  # the boundaries travel as one object, built here on the host
    assert batch["packed_rows"].cu_seqlens_cpu.tolist() == [0, 2, 5]
    assert batch["packed_rows"].seq_ids.tolist() == [[0, 0, 1, 1, 1]]


def test_tokens_seen_are_the_collated_non_padding_tokens(make_config, tmp_path):
    from tnlora.config import resolve_defaults

    cfg = resolve_defaults(
        make_config(tmp_path / "t", "--max_steps", "2", "--max_samples", "6", "--packing", "false",
                    "--per_device_train_batch_size", "3"),
        cuda=False, cuda_bf16=False,
    )  # fmt: skip
    tokenizer = build_tokenizer(cfg)
    data = build_datasets(cfg, tokenizer)
    trainer = build_trainer(cfg, build_model(cfg, tokenizer), tokenizer, data)
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(len(row["input_ids"]) for row in data.train)


def test_full_and_freeze_finetuning_save_model_weights(make_config, tmp_path):
    full = train(make_config(tmp_path / "full", "--finetuning_type", "full", "--max_steps", "4"))
    assert full.trainable_params == full.total_params
    assert (tmp_path / "full" / "model.safetensors").is_file() and (tmp_path / "full" / "config.json").is_file()
    losses = [e["loss"] for e in full.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    frozen = train(
        make_config(tmp_path / "freeze", "--finetuning_type", "freeze", "--freeze_trainable_layers", "1",
                    "--max_steps", "2")
    )  # fmt: skip
    assert 0 < frozen.trainable_params < frozen.total_params


# --- refusals that need the model or the file system (through the CLI, in-process) -------------------------


def _cli_train(make_config, out: Path, *extra: str) -> list[str]:
    cfg = make_config(out)
    argv = ["train"]
    for key in ("model_name_or_path", "dataset", "dataset_dir", "template", "output_dir"):
        argv += [f"--{key}", str(getattr(cfg, key))]
    return [*argv, "--max_steps", "1", "--report_to", "none", *extra]


def test_lora_target_matching_nothing_lists_the_linear_layers(make_config, tmp_path, capsys):
    code = main(_cli_train(make_config, tmp_path / "o", "--lora_target", "q_proj,v_proj"))
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: lora_target: 'q_proj', 'v_proj' matches no linear layer of this model")
    assert "its linear layers are: out_proj, qkvu_proj, l1, l2, l3" in err
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def _listing(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to show a refused run touched nothing)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_folder_of_the_users_is_never_touched(make_config, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite_output_dir", "true")):
        assert main(_cli_train(make_config, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err == (f"error: output_dir: {out} is not empty and was not written by tnlora train (it holds "
                       "notes.txt); not touching it: choose another folder\n")  # fmt: skip
    assert _listing(out) == {"notes.txt": b"mine"}
    # nothing to resume from
    assert main(_cli_train(make_config, out, "--resume_from_checkpoint", "true")) == 2
    assert "no checkpoint-N folder" in capsys.readouterr().err


def test_overwrite_replaces_only_the_earlier_runs_files(make_config, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_cli_train(make_config, out, "--max_steps", "2", "--save_steps", "1")) == 0
    marker = json.loads((out / "tnlora_output.json").read_text())
    assert marker["verb"] == "train" and {"checkpoint-1", "checkpoint-2", "adapter_model.safetensors"} <= set(
        marker["files"]
    )
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(_cli_train(make_config, out)) == 2
    assert capsys.readouterr().err.startswith(
        f"error: output_dir: {out} holds an earlier tnlora train output; pass --overwrite_output_dir true"
    )
    # A file of the user's beside the run: the run is not replaced, and nothing is deleted.
    (out / "generations.jsonl").write_text("{}")
    before = _listing(out)
    assert main(_cli_train(make_config, out, "--overwrite_output_dir", "true")) == 2
    assert "holds files tnlora did not write (generations.jsonl)" in capsys.readouterr().err
    assert _listing(out) == before
    (out / "generations.jsonl").unlink()
    assert main(_cli_train(make_config, out, "--overwrite_output_dir", "true")) == 0
    assert not (out / "checkpoint-2").exists() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (("--dataset", "quickstart_alpacca"), "unknown dataset 'quickstart_alpacca'"),
        (("--dataset_dir", "/nowhere/data"), "no such file or directory"),
        (("--lora_target", "q_proj"), "lora_target: 'q_proj' matches no linear layer"),
        (("--cutoff_len", "2"), "dataset: no example left after encoding with cutoff_len 2 (encoded 0/60 examples"),
        (("--dataset", "BAD"), "record 2"),
        (("--template", "chatmll"), "template: unknown template"),
    ],
)
def test_a_refused_run_deletes_nothing_of_the_earlier_one(make_config, tmp_path, capsys, mistake, message):
    out = tmp_path / "o"
    assert main(_cli_train(make_config, out)) == 0
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]')
    mistake = tuple(str(tmp_path / "bad.json") if m == "BAD" else m for m in mistake)
    before = _listing(out)
    capsys.readouterr()
    assert main(_cli_train(make_config, out, "--overwrite_output_dir", "true", *mistake)) == 2
    err = capsys.readouterr().err
    # One error line, last (the data pipeline's summary lines may come before it), no traceback.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err and "EncodeStats(" not in err
    assert _listing(out) == before


def test_an_interrupted_run_is_still_recognised_as_tnloras(make_config, tmp_path):
    from tnlora.errors import ConfigError

    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="out of GPU memory"):
        train(make_config(out, "--max_steps", "2"), callbacks=[_OutOfMemoryAtStep()])
    listed = json.loads((out / "tnlora_output.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir())
    # A checkpoint the marker does not list yet (a run killed mid-save) is the run's too.
    (out / "checkpoint-7").mkdir()
    assert train(make_config(out, "--max_steps", "1", "--overwrite_output_dir", "true")).global_step == 1
    assert not (out / "checkpoint-7").exists()


def test_a_run_written_before_markers_is_replaced_too(make_config, tmp_path):
    out = tmp_path / "o"
    train(make_config(out, "--max_steps", "1"))
    (out / "tnlora_output.json").unlink()
    train(make_config(out, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert (out / "tnlora_output.json").is_file()


def test_inputs_and_the_current_folder_are_never_the_output(make_config, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES / "data", data)
    argv = _cli_train(make_config, data, "--dataset_dir", str(data), "--overwrite_output_dir", "true")
    assert main(argv) == 2
    assert f"error: output_dir: {data} holds the dataset folder ({data})" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(_cli_train(make_config, tmp_path / "x", "--output_dir", ".")) == 2
    assert capsys.readouterr().err == f"error: output_dir: {tmp_path} is the current folder; name a new folder for the output\n"
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in (EXAMPLES / "data").iterdir())


def test_refusals_come_before_the_model_loads(make_config, tmp_path, capsys, monkeypatch):
    import tnlora.train.run as run

    def boom(*args, **kwargs):
        raise AssertionError("the model must not load for a refused config")

    monkeypatch.setattr(run, "load_base_model", boom)
    assert main(_cli_train(make_config, tmp_path / "a", "--template", "chatmll")) == 2
    assert capsys.readouterr().err.startswith("error: template: unknown template 'chatmll'")
    assert main(_cli_train(make_config, tmp_path / "b", "--model_name_or_path", "huge")) == 2
    assert capsys.readouterr().err.startswith("error: model_name_or_path: 'huge' is neither a preset")
    assert main(_cli_train(make_config, tmp_path / "c", "--dataset", "nope.json")) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(_cli_train(make_config, tmp_path / "d", "--sample_prompts", str(tmp_path / "prompts.txt"))) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'prompts.txt'}: prompts file not found\n"
    assert not (tmp_path / "d").exists()


def test_lora_targets_are_checked_on_the_meta_device_before_weights_load(
    official_dir, make_config, tmp_path, capsys, monkeypatch
):
    import tnlora.model.modeling as modeling
    import tnlora.train.run as run

    def boom(*args, **kwargs):
        raise AssertionError("no weights may be read for a refused config")

    monkeypatch.setattr(run, "load_base_model", boom)
    monkeypatch.setattr(modeling.TransnormerForCausalLM, "from_pretrained", boom)
    for model in ("tiny", str(official_dir)):
        assert main(_cli_train(make_config, tmp_path / "o", "--model_name_or_path", model,
                               "--lora_target", "q_proj,l1")) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith("error: lora_target: 'q_proj' matches no linear layer of this model (TransNormerLLM")
        assert main(_cli_train(make_config, tmp_path / "o", "--model_name_or_path", model,
                               "--finetuning_type", "freeze", "--freeze_trainable_layers", "3")) == 2  # fmt: skip
        assert "freeze_trainable_layers: 3 but the model has only 2 layers" in capsys.readouterr().err
        assert main(_cli_train(make_config, tmp_path / "o", "--model_name_or_path", model,
                               "--gradient_checkpointing", "true", "--uncheckpointed_layers", "3")) == 2  # fmt: skip
        assert capsys.readouterr().err == "error: uncheckpointed_layers: 3 but the model has only 2 layers\n"
    assert not (tmp_path / "o").exists()


def test_preset_names_ignore_letter_case_and_the_run_records_the_canonical_one(make_config, tmp_path):
    result = train(make_config(tmp_path / "o", "--model_name_or_path", "TINY", "--max_steps", "1"))
    assert result.config.model_name_or_path == "tiny"
    assert "model_name_or_path: tiny\n" in (tmp_path / "o" / "tnlora_run.yaml").read_text()


def test_the_adapter_model_card_names_the_base_model_and_no_peft_warning(make_config, tmp_path, recwarn):
    train(make_config(tmp_path / "o", "--max_steps", "2", "--save_steps", "1"))
    for directory in (tmp_path / "o", tmp_path / "o" / "checkpoint-1"):
        card = (directory / "README.md").read_text()
        assert "Base model: tnlora preset `tiny`" in card, directory
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


@pytest.mark.parametrize(("packing", "sampler"), [("false", "LengthGroupedSampler"), ("true", "RandomSampler")])
def test_unpacked_batches_are_length_grouped(make_config, tmp_path, packing, sampler):
    from tnlora.config import resolve_defaults

    cfg = resolve_defaults(make_config(tmp_path / "s", "--packing", packing), cuda=False, cuda_bf16=False)
    tokenizer = build_tokenizer(cfg)
    trainer = build_trainer(cfg, build_model(cfg, tokenizer), tokenizer, build_datasets(cfg, tokenizer))
    assert type(trainer._get_train_sampler()).__name__ == sampler


def test_gradient_checkpointing_changes_nothing_but_memory(make_config, tmp_path, monkeypatch):
    from tnlora.model.modeling import TransnormerDecoderLayer

    args = ("--max_steps", "2", "--per_device_train_batch_size", "2")
    plain = train(make_config(tmp_path / "plain", *args))
    checkpointed = train(make_config(tmp_path / "gc", *args, "--gradient_checkpointing", "true"))
    # each mixer checkpointed apart: the token step runs as a function of its own only then, in the forward and
    # in the recompute
    steps = []
    mix_tokens = TransnormerDecoderLayer.mix_tokens
    monkeypatch.setattr(TransnormerDecoderLayer, "mix_tokens", lambda self, *a: steps.append(1) or mix_tokens(self, *a))
    apart = train(make_config(tmp_path / "apart", *args, "--gradient_checkpointing", "true",
                              "--checkpoint_regions", "mixers"))  # fmt: skip
    assert steps
    # and every layer left out of checkpointing (the tiny model has two): each runs as one piece, never
    # through the token step alone (but the last layer trimmed to the labelled positions, whose token step is
    # given them as ``keep``)
    signature = inspect.signature(mix_tokens)

    def whole_token_step(self, *a, **kw):
        if signature.bind(self, *a, **kw).arguments.get("keep") is None:
            steps.append(1)
        return mix_tokens(self, *a, **kw)

    monkeypatch.setattr(TransnormerDecoderLayer, "mix_tokens", whole_token_step)
    steps.clear()
    kept = train(make_config(tmp_path / "kept", *args, "--gradient_checkpointing", "true",
                             "--checkpoint_regions", "mixers", "--uncheckpointed_layers", "2"))  # fmt: skip
    assert not steps
    a = _adapter_tensors(plain.output_dir)
    for run in (checkpointed, apart, kept):
        b = _adapter_tensors(run.output_dir)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_attention_impl_reaches_every_token_mixer():
    from tnlora.model.loading import load_base_model

    chunked = load_base_model("tiny", attention_impl="chunked")
    recurrent = load_base_model("tiny", attention_impl="recurrent")
    assert {m.impl for m in recurrent.modules() if isinstance(getattr(m, "impl", None), str)} == {"recurrent"}
    assert {m.impl for m in chunked.modules() if isinstance(getattr(m, "impl", None), str)} == {"chunked"}
    torch.testing.assert_close(logits(recurrent), logits(chunked), rtol=1e-4, atol=1e-4)


class _DtypesWhileTraining(TrainerCallback):
    def __init__(self) -> None:
        self.trainable: set[torch.dtype] = set()
        self.frozen: set[torch.dtype] = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            (self.trainable if p.requires_grad else self.frozen).add(p.dtype)


def test_bf16_keeps_the_frozen_base_in_bf16_and_trains_fp32_adapters(make_config, tmp_path):
    # The GPU default, run on CPU autocast: the base is loaded in bf16, everything trainable is fp32.
    seen = _DtypesWhileTraining()
    result = train(make_config(tmp_path / "bf16", "--bf16", "true", "--max_steps", "2",
                               "--additional_target", "embed_tokens"), callbacks=[seen])  # fmt: skip
    assert seen.trainable == {torch.float32} and seen.frozen == {torch.bfloat16}
    # Returned for inference: all bf16, as the saved adapter loaded onto the bf16 base would be.
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert "bf16: true" in (tmp_path / "bf16" / "tnlora_run.yaml").read_text()
    saved = _adapter_tensors(result.output_dir)
    assert any("modules_to_save" in k or "embed_tokens" in k for k in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    # The returned model works outside the Trainer's autocast (sample_prompts generate with it): peft's
    # adapter input casts, skipped while training, are back on.
    model = result.model.eval()
    with torch.no_grad():
        out = model.generate(PROBE, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (1, PROBE.shape[1] + 3)


def test_bf16_freeze_tuning_returns_a_usable_fp32_model(make_config, tmp_path):
    # Freeze tuning trains fp32 master weights of an fp32 model under autocast: nothing is cast afterwards.
    result = train(make_config(tmp_path / "f", "--bf16", "true", "--max_steps", "1", "--finetuning_type", "freeze",
                               "--freeze_trainable_layers", "1"))  # fmt: skip
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    with torch.no_grad():
        out = result.model.eval().generate(PROBE, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, PROBE.shape[1] + 2)


def test_overwrite_never_deletes_the_base_model(official_dir, make_config, tmp_path, capsys):
    before = _listing(official_dir)
    argv = _cli_train(make_config, official_dir, "--model_name_or_path", str(official_dir),
                      "--overwrite_output_dir", "true")  # fmt: skip
    assert main(argv) == 2
    assert "holds the base model" in capsys.readouterr().err
    assert _listing(official_dir) == before


def test_tokenised_dataset_is_cached_and_reused(tmp_path: Path, make_config, monkeypatch) -> None:
    import tnlora.data.encode as encode

    cfg = make_config(tmp_path / "out", "--dataset_cache_dir", str(tmp_path / "cache"))
    tokenizer = build_tokenizer(cfg)
    first = build_datasets(cfg, tokenizer)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    class NoTokenising:
        def __init__(self, *args, **kwargs):
            raise AssertionError("tokenised again despite a cache hit")

    monkeypatch.setattr(encode, "PieceEncoder", NoTokenising)
    second = build_datasets(cfg, tokenizer)
    assert [r["input_ids"] for r in second.train] == [r["input_ids"] for r in first.train]
    with pytest.raises(AssertionError, match="tokenised again"):
        build_datasets(make_config(tmp_path / "out", "--overwrite_cache", "true"), tokenizer)


class _OutOfMemoryAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_one_line_naming_the_keys(make_config, tmp_path):
    from tnlora.errors import ConfigError

    cfg = make_config(tmp_path / "o", "--max_steps", "1", "--per_device_train_batch_size", "16")
    with pytest.raises(ConfigError) as info:
        train(cfg, callbacks=[_OutOfMemoryAtStep()])
    assert str(info.value) == (
        "out of GPU memory with micro-batches of up to 16 × 256 tokens (per_device_train_batch_size × "
        "cutoff_len); try gradient_checkpointing: true, or use_unsloth_gc: true (layer inputs kept in CPU "
        "memory), or a per_device_train_batch_size below 16"
    )


def test_out_of_memory_advice_with_the_mixers_apart_names_what_they_keep():
    from tnlora.config import load_run_config
    from tnlora.train.run import out_of_memory_advice

    base = ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o", "--gradient_checkpointing", "true",
            "--per_device_train_batch_size", "2"]  # fmt: skip
    cfg = load_run_config(None, [*base, "--checkpoint_regions", "mixers"])
    # not use_unsloth_gc, which the mixers apart refuse
    assert out_of_memory_advice(cfg).endswith(
        "try checkpoint_regions: layer and uncheckpointed_layers: 0 (fewer activations kept), or a "
        "per_device_train_batch_size below 2"
    )
    kept = load_run_config(None, [*base, "--uncheckpointed_layers", "2"])
    assert "checkpoint_regions: layer and uncheckpointed_layers: 0" in out_of_memory_advice(kept)
    assert "use_unsloth_gc: true" in out_of_memory_advice(kept)


def test_trainer_keys_reach_the_training_arguments(make_config, tmp_path):
    from tnlora.config import resolve_defaults
    from tnlora.train.trainer import training_arguments

    cfg = resolve_defaults(make_config(
        tmp_path / "o", "--val_size", "4", "--eval_strategy", "epoch", "--save_strategy", "epoch",
        "--logging_strategy", "epoch", "--save_only_model", "true", "--ddp_timeout", "180000000",
        "--ddp_find_unused_parameters", "false", "--run_name", "r1", "--lr_scheduler_type", "cosine_with_restarts",
        "--lr_scheduler_kwargs", '{"num_cycles": 2}', "--save_total_limit", "2", "--weight_decay", "0.01",
        "--per_device_eval_batch_size", "3", "--dataloader_num_workers", "1",
    ), cuda=False, cuda_bf16=False)  # fmt: skip
    args = training_arguments(cfg, has_eval=True)
    # (the strategies are str enums of transformers: equal to their names)
    assert (args.eval_strategy, args.save_strategy, args.logging_strategy) == ("epoch", "epoch", "epoch")
    assert (args.save_only_model, args.ddp_timeout, args.ddp_find_unused_parameters) == (True, 180000000, False)
    assert (args.run_name, args.lr_scheduler_kwargs, args.save_total_limit) == ("r1", {"num_cycles": 2}, 2)
    assert (args.weight_decay, args.per_device_eval_batch_size, args.dataloader_num_workers) == (0.01, 3, 1)
    assert training_arguments(cfg, has_eval=False).eval_strategy == "no"


def test_tokens_seen_are_logged_when_asked_and_tensorboard_goes_to_logging_dir(make_config, tmp_path):
    result = train(make_config(tmp_path / "o", "--max_steps", "2", "--logging_steps", "1",
                               "--include_num_input_tokens_seen", "true", "--report_to", "tensorboard",
                               "--logging_dir", str(tmp_path / "tb")))  # fmt: skip
    logged = [e["num_input_tokens_seen"] for e in result.log_history if "loss" in e]
    assert len(logged) == 2 and 0 < logged[0] < logged[1]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "o" / "runs").exists()


def test_sample_replies_at_each_evaluation_leave_the_trained_weights_unchanged(trained, make_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tnlora.infer.generate import GenerationOptions, generate_replies

    # the same run without sampling: LoRA dropout draws from the random state, which sampling must leave alone
    plain = train(make_config(tmp_path / "plain", *TRAINED_ARGS))
    for name in ("", "checkpoint-12"):
        ours, theirs = _adapter_tensors(trained.output_dir / name), _adapter_tensors(plain.output_dir / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert plain.samples is None and not (plain.output_dir / "samples.jsonl").exists()

    rows = [json.loads(line) for line in (trained.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (12, 24) for p in SAMPLE_PROMPTS]
    assert trained.samples == rows[2:]
    # the replies at the end are the trained model's greedy replies
    options = GenerationOptions(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    trained.model.eval()
    expected = generate_replies(trained.model, trained.tokenizer, trained.template,
                                [[{"role": "user", "content": p}] for p in SAMPLE_PROMPTS], options)  # fmt: skip
    assert [r["reply"] for r in rows[2:]] == expected
    assert "samples.jsonl" in json.loads((trained.output_dir / "tnlora_output.json").read_text())["files"]
    # and TensorBoard's text tab has them, one tag per prompt, at each sampled step
    board = EventAccumulator(str(next((trained.output_dir / "runs").iterdir())), size_guidance={"tensors": 0})
    board.Reload()
    texts = board.Tensors("samples/2/text_summary")
    assert [t.step for t in texts] == [12, 24]
    assert texts[-1].tensor_proto.string_val[0].decode().startswith(f"**{SAMPLE_PROMPTS[1]}**")


def test_dedup_drops_exact_repeats_before_training_and_says_how_many(make_config, tmp_path, capsys):
    from fixture_files import FIXTURES

    cfg = make_config(tmp_path / "o", "--dataset", str(FIXTURES / "data" / "audit_sample.json"), "--dedup", "true",
                      "--max_steps", "1")  # fmt: skip
    result = train(cfg)
    assert "dedup: dropped 3 records that exactly repeat an earlier one (10 left)" in capsys.readouterr().err
    assert result.global_step == 1
    plain = load_examples_of(make_config(tmp_path / "p", "--dataset", str(FIXTURES / "data" / "audit_sample.json")))
    deduped = load_examples_of(cfg)
    assert (plain.stats["records"], deduped.stats["records"], deduped.stats["duplicates_dropped"]) == (13, 10, 3)
    assert len({tuple(e["input_ids"] if isinstance(e, dict) else e.input_ids) for e in deduped.train}) == 10


def load_examples_of(cfg):
    from tnlora.train.run import get_template_checked, load_examples

    return load_examples(cfg, build_tokenizer(cfg), get_template_checked(cfg.template, cfg.system))


def test_do_predict_scores_greedy_replies_to_the_eval_set(make_config, tmp_path):
    pytest.importorskip("jieba", reason="do_predict's metrics need the 'eval' extra (jieba, rouge-chinese, nltk)")
    from tnlora.data.readers import load_conversations
    from tnlora.infer.evaluate import score_predictions
    from tnlora.train.run import split_validation

    cfg = make_config(tmp_path / "o", "--max_steps", "2", "--val_size", "4", "--do_predict", "true",
                      "--predict_with_generate", "true", "--max_new_tokens", "4")  # fmt: skip
    result = train(cfg)
    out = result.output_dir
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records = load_conversations(cfg.dataset, cfg.dataset_dir)
    _, held = split_validation(records, 4, cfg.seed)
    assert [r["reference"] for r in rows] == [c.messages[-1].content for c in held]
    assert [r["prompt"] for r in rows] == [c.messages[-2].content for c in held]
    metrics = json.loads((out / "predict_results.json").read_text())
    assert metrics == pytest.approx(score_predictions(rows))
    assert json.loads((out / "all_results.json").read_text())["predict_rouge-l"] == metrics["predict_rouge-l"]
    assert result.metrics["predict_bleu-4"] == metrics["predict_bleu-4"]
    files = json.loads((out / "tnlora_output.json").read_text())["files"]
    assert {"predictions.jsonl", "predict_results.json"} <= set(files)


def test_bf16_runs_sample_under_the_training_autocast(make_config, tmp_path):
    # the adapter is fp32 over a bf16 base with peft's input casts off while training: outside autocast a sample
    # would mix dtypes
    result = train(make_config(tmp_path / "o", "--bf16", "true", "--max_steps", "2", "--val_size", "4",
                               "--eval_steps", "1", "--sample_prompts", "Who are you?"))  # fmt: skip
    rows = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(isinstance(r["reply"], str) for r in rows)
