"""tnlora.config: YAML + overrides → one validated RunConfig; every refusal names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tnlora.config import (
    RUN_CONFIG_NAME,
    RunConfig,
    load_run_config,
    parse_overrides,
    read_run_config,
    resolve_defaults,
    save_run_config,
)
from tnlora.errors import ConfigError

BASE = ["--model_name_or_path", "tiny", "--dataset", "d.json", "--output_dir", "out"]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(path, BASE + overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_yaml_values_are_typed_and_overrides_win(tmp_path):
    path = write_yaml(
        tmp_path,
        "model_name_or_path: tiny\ndataset: [a.json, b.json]\noutput_dir: o\nlearning_rate: 1e-4\n"
        "lora_target: [l1, l2]\nlora_rank: 4\nnum_train_epochs: 2\n",
    )
    cfg = load_run_config(path, ["--lora_rank", "16", "--packing", "--system=Be brief.", "--bf16", "false"])
    assert cfg.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as a string
    assert cfg.dataset == "a.json,b.json"
    assert cfg.lora_targets() == ["l1", "l2"]
    assert cfg.lora_rank == 16
    assert cfg.packing is True
    assert cfg.system == "Be brief."
    assert cfg.bf16 is False
    assert cfg.num_train_epochs == 2.0 and isinstance(cfg.num_train_epochs, float)


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=x=y", "--flag", "--c", "-3"]) == {
        "a": "1",
        "b": "x=y",
        "flag": True,
        "c": "-3",
    }
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_unknown_key_suggests_the_close_one(tmp_path):
    assert "unknown config key 'lora_rnak'" in refusal(["--lora_rnak", "4"])
    assert "did you mean 'lora_rank'" in refusal(["--lora_rnak", "4"])
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: d\noutput_dir: o\nlearnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learnig_rate' in .*run.yaml \(did you mean 'learning_rate'"):
        load_run_config(path)


def test_bad_type_is_refused_with_the_key():
    assert refusal(["--lora_rank", "eight"]) == "lora_rank: expected an integer, got 'eight' (from --lora_rank)"
    assert refusal(["--learning_rate", "fast"]).startswith("learning_rate: expected a number")
    assert refusal(["--packing", "maybe"]).startswith("packing: expected true or false")


def test_bad_type_from_yaml(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: d\noutput_dir: o\ncutoff_len: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^cutoff_len: expected an integer, got \[1, 2\]$"):
        load_run_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--lora_rank", "0"], "lora_rank: must be >= 1, got 0"),
        (["--lora_dropout", "1.0"], "lora_dropout: must be < 1, got 1.0"),
        (["--learning_rate", "0"], "learning_rate: must be > 0, got 0.0"),
        (["--cutoff_len", "1"], "cutoff_len: must be >= 2, got 1"),
        (["--warmup_ratio", "-0.1"], "warmup_ratio: must be >= 0, got -0.1"),
        (["--max_steps", "0"], "max_steps: must be -1"),
        (["--val_size", "2.5"], "val_size: a fraction below 1 or a whole number"),
        (["--nan_skip_limit", "-1"], "nan_skip_limit: must be >= 0, got -1"),
    ],
)
def test_bad_range_is_refused(override, expected):
    assert refusal(override).startswith(expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--finetuning_type", "qlora"], "finetuning_type: must be one of lora, full, freeze; got 'qlora'"),
        (["--lr_scheduler_type", "cosine_annealing"], "lr_scheduler_type: must be one of linear, cosine"),
        (["--report_to", "wandb"], "report_to: logging to Weights & Biases ('wandb') is not available in tnlora"),
        (["--stage", "dpo"], "stage: DPO ('dpo') is not available in tnlora, which trains sft only"),
        (["--attention_impl", "flash"], "attention_impl: must be one of auto, chunked"),
        (["--nan_policy", "ignore"], "nan_policy: must be one of stop, skip; got 'ignore'"),
    ],
)
def test_bad_choice_is_refused(override, expected):
    assert refusal(override).startswith(expected)


def test_required_keys_and_combinations():
    with pytest.raises(ConfigError, match=r"^model_name_or_path: required"):
        load_run_config(None, ["--dataset", "d", "--output_dir", "o"])
    with pytest.raises(ConfigError, match=r"^output_dir: required"):
        load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d"])
    assert refusal(["--train_on_prompt", "--mask_history"]).startswith("mask_history: cannot be combined")
    assert refusal(["--warmup_ratio", "0.1", "--warmup_steps", "5"]).startswith("warmup_steps:")
    # null is allowed for optional keys only
    assert load_run_config(None, [*BASE, "--system", "null"]).system is None
    assert refusal(["--lora_rank", "null"]) == "lora_rank: a value is required, got null (from --lora_rank)"


def test_yaml_problems_are_one_line(tmp_path):
    bad = write_yaml(tmp_path, "model_name_or_path: tiny\n  dataset: : x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        load_run_config(bad)
    listy = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_run_config(listy)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_resume_from_checkpoint_words():
    assert load_run_config(None, [*BASE, "--resume_from_checkpoint", "true"]).resume_from_checkpoint is True
    assert load_run_config(None, [*BASE, "--resume_from_checkpoint", "false"]).resume_from_checkpoint is None
    # a checkpoint path is recorded absolute, like every path of a run
    assert load_run_config(None, [*BASE, "--resume_from_checkpoint", "o/checkpoint-3"]).resume_from_checkpoint == (
        str(Path.cwd() / "o" / "checkpoint-3")
    )


def test_dataset_dir_is_found_beside_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: d\noutput_dir: o\ndataset_dir: data\n")
    monkeypatch.chdir(tmp_path.parent)
    assert Path(load_run_config(path).dataset_dir) == tmp_path / "data"


def test_resolve_defaults_cpu_and_gpu():
    cfg = load_run_config(None, [*BASE, "--lora_rank", "4"])
    cpu = resolve_defaults(cfg, cuda=False, cuda_bf16=False)
    assert (cpu.bf16, cpu.packing, cpu.torch_compile, cpu.lora_alpha) == (False, False, False, 8.0)
    gpu = resolve_defaults(cfg, cuda=True, cuda_bf16=True)
    assert (gpu.bf16, gpu.packing, gpu.torch_compile) == (True, True, True)
    assert (cpu.optim, gpu.optim) == ("adamw_torch", "adamw_torch_fused")
    picked = load_run_config(None, [*BASE, "--optim", "adamw_torch"])
    assert resolve_defaults(picked, cuda=True, cuda_bf16=True).optim == "adamw_torch"  # a set value stays
    chosen = load_run_config(None, [*BASE, "--torch_compile", "false", "--packing", "false"])
    assert (resolve_defaults(chosen, cuda=True, cuda_bf16=True).torch_compile, chosen.packing) == (False, False)
    with pytest.raises(ConfigError, match=r"^bf16:"):
        resolve_defaults(load_run_config(None, [*BASE, "--bf16", "true"]), cuda=True, cuda_bf16=False)
    assert cfg.bf16 is None  # resolving returns a copy
    # The batch: 8 examples unpacked; packed, as many cutoff_len rows as make 16,384 tokens; a set value stays.
    assert (cpu.per_device_train_batch_size, gpu.per_device_train_batch_size) == (8, 16)
    short = resolve_defaults(load_run_config(None, [*BASE, "--cutoff_len", "384"]), cuda=True, cuda_bf16=True)
    assert short.per_device_train_batch_size == 42
    long = resolve_defaults(load_run_config(None, [*BASE, "--cutoff_len", "65536"]), cuda=True, cuda_bf16=True)
    assert long.per_device_train_batch_size == 1
    mine = load_run_config(None, [*BASE, "--per_device_train_batch_size", "3"])
    assert resolve_defaults(mine, cuda=True, cuda_bf16=True).per_device_train_batch_size == 3


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_defaults(
        load_run_config(None, [*BASE, "--sample_prompts", "hi", "--system", "S"]), cuda=False, cuda_bf16=False
    )
    save_run_config(cfg, tmp_path)
    assert (tmp_path / RUN_CONFIG_NAME).is_file()
    again = read_run_config(tmp_path)
    assert again == cfg
    assert isinstance(again, RunConfig)
    assert read_run_config(tmp_path / "nowhere") is None


@pytest.mark.parametrize(
    "name",
    [
        "quickstart.yaml",
        "huanhuan_7b_lora.yaml",
        "huanhuan_1b_lora.yaml",
        "huanhuan_7b_lora_fast.yaml",
        "huanhuan_7b_qlora.yaml",
    ],
)
def test_example_configs_are_valid(name):
    examples = Path(__file__).resolve().parents[1] / "examples"
    cfg = load_run_config(examples / name)
    assert cfg.finetuning_type == "lora" and cfg.template == "chatml"
    if name == "huanhuan_7b_lora_fast.yaml":  # the seed's adapter; packed 8 x 1,024 rows; defaults left open
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target) == (8, 32, 0.1, "all")
        assert (cfg.packing, cfg.per_device_train_batch_size, cfg.cutoff_len) == (True, 8, 1024)
        assert cfg.gradient_checkpointing is None and cfg.torch_compile is None
    elif name == "huanhuan_7b_qlora.yaml":  # the fast recipe on a 4-bit base, the micro-batch left to the card
        assert (cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization) == (4, "nf4", True)
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.cutoff_len) == (8, 32, 0.1, 1024)
        assert cfg.per_device_train_batch_size is None and cfg.gradient_checkpointing is None
        assert cfg.use_unsloth_gc is None and cfg.torch_compile is None
    elif name.startswith("huanhuan_7b"):  # the seed tutorial's hyper-parameters
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.1)
        assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (4, 4)
        assert (cfg.learning_rate, cfg.num_train_epochs, cfg.cutoff_len) == (1e-4, 3, 384)
        assert cfg.gradient_checkpointing


def test_llamafactory_and_trainer_keys_are_accepted_with_their_meaning(tmp_path):
    path = write_yaml(tmp_path, (
        "model_name_or_path: tiny\ntrust_remote_code: true\nstage: sft\ndo_train: true\ndataset: d.json\n"
        "output_dir: o\npreprocessing_num_workers: 16\ndataloader_num_workers: 4\nsave_only_model: true\n"
        "ddp_timeout: 180000000\nval_size: 0.1\neval_strategy: epoch\nper_device_eval_batch_size: 1\n"
        "save_strategy: epoch\nlogging_strategy: steps\nsave_total_limit: 2\nweight_decay: 0.01\nbf16: true\n"
        "fp16: false\nlr_scheduler_kwargs: {num_cycles: 2}\nrun_name: r1\nlogging_dir: logs\n"
        "include_num_input_tokens_seen: true\nddp_find_unused_parameters: false\nreport_to: none\n"
        "neat_packing: true\ndisable_gradient_checkpointing: true\ndefault_system: Be brief.\n"
        "quantization_bit: null\ndeepspeed: null\nflash_attn: auto\nresume_from_checkpoint: null\n"
    ))  # fmt: skip
    cfg = load_run_config(path)
    assert cfg.trust_remote_code and cfg.preprocessing_num_workers == 16 and cfg.dataloader_num_workers == 4
    assert (cfg.save_only_model, cfg.ddp_timeout, cfg.eval_strategy, cfg.save_strategy) == (True, 180000000, "epoch", "epoch")
    assert cfg.lr_scheduler_kwargs == {"num_cycles": 2} and cfg.run_name == "r1"
    assert cfg.include_num_input_tokens_seen and cfg.ddp_find_unused_parameters is False
    assert (cfg.packing, cfg.gradient_checkpointing, cfg.system) == (True, False, "Be brief.")  # the aliases
    assert cfg.logging_dir == str(Path.cwd() / "logs")
    # from the command line: a JSON mapping
    assert load_run_config(None, [*BASE, "--lr_scheduler_kwargs", '{"power": 2.0}']).lr_scheduler_kwargs == {"power": 2.0}
    # the tnlora key wins over its LLaMA-Factory alias
    assert load_run_config(None, [*BASE, "--neat_packing", "true", "--packing", "false"]).packing is False


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--quantization_method", "hqq"], "quantization_method: 'hqq' is not available in tnlora, which quantizes "
                                           "with bitsandbytes (bnb)"),
        (["--quantization_device_map", "auto"], "quantization_device_map: placing a quantized model across devices"),
        (["--use_galore", "true"], "use_galore: the GaLore optimizer is not available in tnlora"),
        (["--fp16", "true"], "fp16: fp16 mixed precision is not available in tnlora (use bf16: true"),
        (["--flash_attn", "fa2"], "flash_attn: a softmax-attention kernel"),
        (["--eval_strategy", "steps"], "eval_strategy: steps needs an eval set; set val_size"),
        (["--eval_dataset", "e.json", "--val_size", "0.1"], "eval_dataset: set either eval_dataset or val_size"),
        (["--eval_delay", "1"], "unknown config key 'eval_delay': a TrainingArguments option tnlora does not pass on"),
    ],
)
def test_features_tnlora_lacks_are_refused_naming_them(override, expected):
    assert refusal(override).startswith(expected)


def test_llamafactory_quantization_keys_are_run_keys_and_are_saved_with_the_run(tmp_path):
    path = write_yaml(tmp_path, (
        "model_name_or_path: tiny\ndataset: d\noutput_dir: o\nquantization_bit: 4\nquantization_method: bnb\n"
        "quantization_type: fp4\ndouble_quantization: false\n"
    ))  # fmt: skip
    cfg = load_run_config(path)
    assert (cfg.quantization_bit, cfg.quantization_method, cfg.quantization_type, cfg.double_quantization) == (
        4, "bnb", "fp4", False,
    )  # fmt: skip
    save_run_config(cfg, tmp_path)  # what chat, eval, merge and a resumed run read back
    again = read_run_config(tmp_path)
    assert (again.quantization_bit, again.quantization_type, again.double_quantization) == (4, "fp4", False)
    plain = load_run_config(None, BASE)
    assert (plain.quantization_bit, plain.quantization_type, plain.double_quantization) == (None, "nf4", True)
    assert load_run_config(None, [*BASE, "--quantization_bit", "null"]).quantization_bit is None
    assert load_run_config(None, [*BASE, "quantization_bit=8"]).quantization_bit == 8


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--quantization_bit", "2"], "quantization_bit: 4 (QLoRA: NF4/FP4) or 8 (LLM.int8()), the widths "
                                      "bitsandbytes trains with; got 2 (from --quantization_bit)"),
        (["--quantization_bit", "3"], "quantization_bit: 4 (QLoRA: NF4/FP4) or 8 (LLM.int8())"),
        (["--quantization_bit", "4", "--finetuning_type", "full"],
         "quantization_bit: a quantized base trains LoRA adapters only (QLoRA), not finetuning_type: full; drop "
         "quantization_bit or use finetuning_type: lora"),
        (["--quantization_bit", "8", "--finetuning_type", "freeze"], "quantization_bit: a quantized base trains LoRA "
                                                                     "adapters only (QLoRA), not finetuning_type: freeze"),
        (["--quantization_bit", "4", "--bf16", "false"], "bf16: a quantized base (quantization_bit) computes in bf16"),
        (["--quantization_type", "int4"], "quantization_type: must be one of nf4, fp4; got 'int4'"),
    ],
)  # fmt: skip
def test_quantization_that_tnlora_cannot_train_is_refused_in_one_line(override, expected):
    assert refusal(override).startswith(expected)


def test_the_stage_is_checked_first(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: tiny\ndataset: d\noutput_dir: o\npref_beta: 0.1\nstage: dpo\n")
    with pytest.raises(ConfigError, match=r"^stage: DPO \('dpo'\) is not available in tnlora, which trains sft only$"):
        load_run_config(path)


def test_recorded_paths_are_absolute_and_dataset_dir_defaults_to_data(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text('{"mine": {"file_name": "mine.json"}}')
    (tmp_path / "extra.json").write_text("[]")
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(None, ["--model_name_or_path", "models/m", "--dataset", "mine,extra.json,gone.json",
                                 "--output_dir", "saves/run"])  # fmt: skip
    assert cfg.dataset_dir == str(tmp_path / "data")  # LLaMA-Factory's default, here because it holds a registry
    assert cfg.dataset == f"mine,{tmp_path / 'extra.json'},gone.json"  # registered names and unknowns stay names
    assert cfg.model_name_or_path == str(tmp_path / "models" / "m")
    assert cfg.output_dir == str(tmp_path / "saves" / "run")
    assert load_run_config(None, [*BASE, "--model_name_or_path", "OpenNLPLab/TransNormerLLM-7B"]).model_name_or_path == (
        "OpenNLPLab/TransNormerLLM-7B"
    )


def test_key_value_overrides_parse_like_llamafactory():
    assert parse_overrides(["learning_rate=1e-5", "--bf16", "lora_rank=4", "--system", "a=b"]) == {
        "learning_rate": "1e-5",
        "bf16": True,  # a flag followed by key=value of a config key is a flag
        "lora_rank": "4",
        "system": "a=b",  # the value of --system
    }


def test_prediction_keys_need_an_eval_set_and_each_other():
    assert refusal(["--do_predict", "true"]) == (
        "do_predict: needs an eval set to predict; set val_size (a held-out part) or eval_dataset"
    )
    assert refusal(["--predict_with_generate", "true"]).startswith("predict_with_generate: set do_predict: true too")
    assert refusal(["--do_train", "false"]).startswith(
        "do_train: tnlora train always trains; to predict with a trained adapter (do_predict) run tnlora eval"
    )
    cfg = load_run_config(None, [*BASE, "do_predict=true", "predict_with_generate=true", "val_size=0.1"])
    assert cfg.do_predict and cfg.max_new_tokens == 512
    assert load_run_config(None, [*BASE, "--dedup", "true"]).dedup


def test_sample_prompts_are_a_list_one_prompt_or_a_file_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_run_config(None, [*BASE, "--sample_prompts", "Who are you?"]).sample_prompts == "Who are you?"
    assert load_run_config(None, [*BASE, "--sample_prompts", '["Hi", "Who?"]']).sample_prompts == ["Hi", "Who?"]
    assert load_run_config(None, [*BASE, "--sample_prompts", "p.txt"]).sample_prompts == str(tmp_path / "p.txt")
    from_yaml = write_yaml(tmp_path, "sample_prompts:\n  - '[not a list]'\n  - b\n")
    assert load_run_config(from_yaml, BASE).sample_prompts == ["[not a list]", "b"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--fp8", "true", "--finetuning_type", "full"],
         "fp8: computes the frozen base weights' GEMMs of LoRA training in fp8, not finetuning_type: full"),
        (["--fp8", "true", "--quantization_bit", "4"], "fp8: the base is already quantized (quantization_bit)"),
        (["--fp8", "true", "--lora_kernel", "peft"], "fp8: runs in the fused LoRA layer; set lora_kernel: fused"),
        (["--fp8", "true", "--use_dora", "true"], "fp8: DoRA layers keep peft's own forward"),
        (["--fp8_backend", "te"], "fp8_backend: another fp8 backend (fp8: true runs PyTorch's scaled matmul"),
    ],
)  # fmt: skip
def test_fp8_that_tnlora_cannot_train_is_refused_in_one_line(override, expected):
    assert refusal(override).startswith(expected)


def test_fp8_is_a_run_key_with_llamafactorys_backend_key_accepted_at_auto(tmp_path):
    cfg = load_run_config(write_yaml(tmp_path, "fp8: true\nfp8_backend: auto\nfsdp: none\n"), BASE)
    assert cfg.fp8 is True and load_run_config(None, BASE).fp8 is False
    # on a GPU the fp8 GEMMs return bf16; the CPU takes fp32 too
    with pytest.raises(ConfigError, match="fp8: the fp8 GEMMs return bf16 on a GPU; set bf16: true"):
        resolve_defaults(load_run_config(None, [*BASE, "--fp8", "true", "--bf16", "false"]), cuda=True, cuda_bf16=True)
    assert resolve_defaults(cfg, cuda=False, cuda_bf16=False).fp8
