"""tnlora.cli: argument parsing and the one-line error contract (model-free parts; end-to-end runs live in
tests/train and tests/infer)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tnlora.cli import main

BASE = ["--model_name_or_path", "tiny", "--dataset", "d.json", "--output_dir"]


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_key_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run_main(["train", *BASE, str(tmp_path / "o"), "--lora_rnak", "4"], capsys)
    assert code == 2
    assert err == "error: unknown config key 'lora_rnak' (did you mean 'lora_rank'?)\n"
    assert "Traceback" not in err and out == ""


def test_config_file_errors_name_the_file(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: tiny\ndataset: d\noutput_dir: o\nlora_rank: eight\n")
    code, _, err = run_main(["train", str(cfg)], capsys)
    assert code == 2 and err == "error: lora_rank: expected an integer, got 'eight'\n"
    code, _, err = run_main(["train", str(cfg), "--lora_rank=4", "--cutoff_len", "-5"], capsys)
    assert code == 2 and err == "error: cutoff_len: must be >= 2, got -5 (from --cutoff_len)\n"


def test_train_help_lists_the_keys(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    assert "lora_target" in out and "per_device_train_batch_size" in out


def test_bad_arguments_of_other_verbs_are_one_line(capsys):
    code, _, err = run_main(["generate", "--model", "tiny"], capsys)
    assert code == 2
    assert err.startswith("error: the following arguments are required: --prompts, --output")
    assert err.count("\n") == 1
    code, _, err = run_main(["chat", "--do_sample", "perhaps"], capsys)
    assert code == 2 and "expected true or false" in err


def test_no_verb_prints_help_and_fails(capsys):
    code, out, _ = run_main([], capsys)
    assert code == 2 and "chat" in out and "merge" in out


def test_bench_without_module_is_a_clear_error(capsys, monkeypatch):
    # tnlora.bench is the lead's module; hide it if present to check the message
    monkeypatch.setitem(sys.modules, "tnlora.bench", None)
    code, _, err = run_main(["bench", "--help"], capsys)
    assert code == 2
    assert err == "error: the 'bench' verb is not available in this install (tnlora.bench is missing)\n"


def test_console_script_refusal_in_a_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tnlora.cli", "train", *BASE, str(tmp_path / "o"), "--finetuning_type", "qlora"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: finetuning_type: must be one of lora, full, freeze; got 'qlora' (from --finetuning_type)"


def test_python_dash_m_tnlora_is_the_command(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "tnlora"]
    usage = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: tnlora ") and "train" in usage.stdout
    refused = subprocess.run([*run, "train", *BASE, str(tmp_path / "o"), "--finetuning_type", "qlora"],
                             capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr == "error: finetuning_type: must be one of lora, full, freeze; got 'qlora' (from --finetuning_type)\n"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_verb_help_exits_zero(flag, capsys):
    code, out, _ = run_main(["generate", flag], capsys)
    assert code == 0 and "--prompts" in out


def test_data_inspect_reports_on_the_sample_data(capsys):
    data_dir = str(Path(__file__).resolve().parents[1] / "examples" / "data")
    code = main(["data", "inspect", "quickstart_chat", "--dataset_dir", data_dir, "--template", "chatml",
                 "--cutoff_len", "512", "--color", "false"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "records: 10, conversations: 10" in out and "⟦<|im_start|>system" in out


def test_help_and_version_never_import_torch():
    code = (
        "import sys\n"
        "from tnlora.cli import main\n"
        "codes = [main(argv) for argv in (['--help'], ['--version'], ['train', '--help'], ['chat', '--help'],\n"
        "         ['generate', '--help'], ['merge', '--help'], ['export', '--help'], ['eval', '--help'],\n"
        "         ['prepare', '--help'], ['data', 'inspect', '--help'], ['bench', '--help'],\n"
        "         ['bench', 'train', '--help'], ['bench', 'decode', '--help'])]\n"
        "assert codes == [0] * 13, codes\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tnlora 0.1.0" in proc.stdout


def test_version(capsys):
    from tnlora import __version__

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out == f"tnlora {__version__}\n"


def test_train_help_shows_defaults_and_choices(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert code == 0
    assert lines["lora_rank"].endswith("(default 8)")
    assert lines["lr_scheduler_type"].endswith("(default linear; one of linear, cosine, cosine_with_restarts, "
                                               "polynomial, constant, constant_with_warmup, inverse_sqrt)")  # fmt: skip
    assert lines["model_name_or_path"].endswith("(required)")
    assert "refused when set (features tnlora does not have): " in out and "use_galore" in out
    assert lines["deepspeed"].startswith("  deepspeed ") and "fsdp" in lines


def test_key_value_overrides_beside_dashed_ones(capsys, tmp_path):
    # LLaMA-Factory's form: the first problem found names the key, whichever form it came in
    code, _, err = run_main(["train", "model_name_or_path=tiny", "dataset=d.json", f"output_dir={tmp_path}",
                             "lora_rank=eight"], capsys)  # fmt: skip
    assert code == 2 and err == "error: lora_rank: expected an integer, got 'eight' (from --lora_rank)\n"
    code, _, err = run_main(["chat", "max_new_tokens=0", "--model", "tiny"], capsys)
    assert code == 2 and err == "error: --max_new_tokens: must be >= 1, got 0\n"


def test_verb_yaml_maps_llamafactory_keys_and_later_options_win(tmp_path, capsys):
    from tnlora.cli import build_parser, expand_verb_argv

    config = tmp_path / "infer.yaml"
    config.write_text(
        "model_name_or_path: tiny\nadapter_name_or_path: saves/x\ntemplate: chatml\nfinetuning_type: lora\n"
        "trust_remote_code: true\ninfer_backend: huggingface\ninfer_dtype: float32\nmax_new_tokens: 7\n"
        "do_sample: false\n"
    )
    parser = build_parser()
    argv = expand_verb_argv(parser, ["chat", str(config), "temperature=0.3", "--max_new_tokens", "9"])
    args = parser.parse_args(argv)
    assert (args.model, args.adapter, args.template, args.dtype) == ("tiny", "saves/x", "chatml", "float32")
    assert (args.max_new_tokens, args.do_sample, args.temperature) == (9, False, 0.3)
    assert "trust_remote_code: ignored; tnlora never runs a model's remote code" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("infer_backend: vllm", "error: infer_backend: this inference backend (tnlora generates with transformers) "
                                "is not available in tnlora chat; got 'vllm'"),
        ("export_hub_model_id: me/model", "error: export_hub_model_id: uploading to the Hugging Face Hub is not "
                                          "available in tnlora; got 'me/model'"),
        ("adapter_name_or_path: a,b", "error: adapter_name_or_path: one adapter at a time"),
        ("max_new_token: 5", "error: unknown key 'max_new_token' in"),
    ],
)
def test_verb_yaml_refusals_are_one_line(tmp_path, capsys, line, message):
    config = tmp_path / "infer.yaml"
    config.write_text(f"model_name_or_path: tiny\n{line}\n")
    code, _, err = run_main(["chat", str(config)], capsys)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


def test_data_inspect_defaults_to_chatml_and_says_which_tokenizer_counts(capsys):
    data_dir = str(Path(__file__).resolve().parents[1] / "examples" / "data")
    code = main(["data", "inspect", "quickstart_chat", "--dataset_dir", data_dir, "--color", "false"])
    captured = capsys.readouterr()
    assert code == 0
    assert "template: chatml; tokenizer: ByteTokenizer" in captured.out
    assert captured.err == ("note: no --model given: tokens are counted with the byte tokenizer of the tiny "
                            "preset; pass --model DIR for the model's own tokenizer\n")  # fmt: skip


def test_the_data_pipeline_summary_is_shown_at_the_default_level(tmp_path, capsys):
    examples = Path(__file__).resolve().parents[1] / "examples" / "data"
    argv = ["train", "--model_name_or_path", "tiny", "--dataset", "quickstart_alpaca", "--dataset_dir", str(examples),
            "--cutoff_len", "256", "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--plot_loss", "false", "--dataset_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"^encoded \d+/\d+ examples, \d+ tokens \(\d+ learned\); \d+ prompt-truncated, \d+ dropped", err, re.M)
    assert re.search(r"^\d+ conversations from \d+ records", err, re.M)


def test_data_inspect_audits_the_runs_validation_split_or_an_eval_dataset(capsys):
    from fixture_files import FIXTURES
    from tnlora.data.audit import exact_key, near_key
    from tnlora.data.readers import load_conversations
    from tnlora.train.run import split_validation

    sample, eval_set = FIXTURES / "data" / "audit_sample.json", FIXTURES / "data" / "audit_eval.json"
    assert main(["data", "inspect", str(sample), "--val_size", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    train, held = split_validation(load_conversations(str(sample)), 4, 3)
    exact = sum(exact_key(c) in {exact_key(t) for t in train} for c in held)
    near = sum(exact_key(c) not in {exact_key(t) for t in train} and near_key(c) in {near_key(t) for t in train}
               for c in held)  # fmt: skip
    assert exact + near > 0  # the seed puts a repeated record in the split
    assert f"validation split (val_size 4, seed 3): {exact + near} of 4 examples also in the training data " \
           f"(exact {exact}, near {near};" in out  # fmt: skip
    assert main(["data", "inspect", str(sample), "--eval_dataset", str(eval_set)]) == 0
    assert f"eval dataset {eval_set}: 2 of 3 examples also in the training data" in capsys.readouterr().out
    assert main(["data", "inspect", str(sample), "--eval_dataset", str(eval_set), "--val_size", "0.1"]) == 2
    assert capsys.readouterr().err.endswith("error: --eval_dataset: set either eval_dataset or val_size, not both\n")
