"""Load a base model (+ adapter) for inference, with the template and system prompt training used."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tnlora.config import RUN_CONFIG_NAME, RunConfig, read_run_config
from tnlora.data.templates import TEMPLATE_FILE
from tnlora.errors import TnloraError

DEFAULT_TEMPLATE = "chatml"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class InferenceModel:
    """A ready-to-run model with everything needed to prompt it the way it was trained."""

    model: Any
    tokenizer: Any
    template: Any
    system: str | None
    device: torch.device
    base: str
    adapter: Path | None = None
    run_config: RunConfig | None = None
    quantization: Any = None  # tnlora.model.quantization.Quantization of a quantized base, else None


def run_dir_of(adapter: str | Path) -> Path | None:
    """The training output dir that describes ``adapter``: itself, or the parent of a checkpoint-N."""
    adapter = Path(adapter)
    for candidate in (adapter, adapter.parent):
        if (candidate / TEMPLATE_FILE).is_file() or (candidate / RUN_CONFIG_NAME).is_file():
            return candidate
    return None


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TnloraError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TnloraError("--device: CUDA requested but no GPU is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a GPU that supports it, fp32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise TnloraError(f"--dtype: must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _adapter_base_name(adapter: Path) -> str | None:
    cfg_file = adapter / "adapter_config.json"
    if cfg_file.is_file():
        return json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return None


def base_model_of(model: str | None, adapter: str | Path | None) -> tuple[str, Path | None, RunConfig | None]:
    """(base model, run dir, run config) for ``model`` and/or ``adapter``, without loading anything.

    The base is ``model`` when given, else the one the adapter's run recorded (``model_name_or_path`` in its
    tnlora_run.yaml, or peft's ``base_model_name_or_path``), as a preset's canonical name, a directory's
    absolute path or a Hub id. A recorded base that is no longer there is refused in one line naming the file
    that records it and ``--model``, which overrides it.
    """
    from tnlora.model.hub import model_source

    adapter_path = Path(adapter) if adapter else None
    if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
        raise TnloraError(f"--adapter: {adapter_path} holds no adapter_config.json (not a LoRA output dir)")
    # The adapter's run; with no adapter, a merged or fully fine-tuned model dir carries its own run files.
    if adapter_path is not None:
        run_dir = run_dir_of(adapter_path)
    else:
        run_dir = run_dir_of(model) if model and Path(model).is_dir() else None
    run_cfg = read_run_config(run_dir) if run_dir else None
    if model:
        return model_source(model, key="--model"), run_dir, run_cfg
    recorded, where = None, None
    if run_cfg is not None and run_cfg.model_name_or_path:
        recorded, where = run_cfg.model_name_or_path, f"{run_dir / RUN_CONFIG_NAME} (model_name_or_path)"
    elif adapter_path is not None and _adapter_base_name(adapter_path):
        recorded = _adapter_base_name(adapter_path)
        where = f"{adapter_path / 'adapter_config.json'} (base_model_name_or_path)"
    if not recorded:
        raise TnloraError("--model: required (no adapter run config names the base model)")
    try:
        return model_source(recorded, key="--model"), run_dir, run_cfg
    except TnloraError:
        raise TnloraError(
            f"--model: the base model {recorded} recorded in {where} is not there; pass --model with its "
            "directory, Hub id or preset"
        ) from None


def load_template(run_dir: Path | None, name: str | None):
    """The saved template of the run (``template.json``) unless ``name`` overrides it."""
    from tnlora.data.templates import Template, get_template

    saved = Template.load(run_dir / TEMPLATE_FILE) if run_dir and (run_dir / TEMPLATE_FILE).is_file() else None
    if name is None:
        if saved is not None:
            return saved
        print(f"note: no --template given and no saved template; using {DEFAULT_TEMPLATE}", file=sys.stderr)
        name = DEFAULT_TEMPLATE
    try:
        template = get_template(name)
    except (TnloraError, KeyError, ValueError) as exc:
        raise TnloraError(f"--template: {exc}") from None
    if saved is not None and saved.to_dict() != template.to_dict():
        print(f"warning: --template {name} differs from the template the adapter was trained with", file=sys.stderr)
    return template


def inference_quantization(
    run_cfg: RunConfig | None,
    quantization_bit: int | None = None,
    quantization_type: str | None = None,
    double_quantization: bool | None = None,
):  # -> tnlora.model.quantization.Quantization | None
    """How to quantize the base for inference: ``quantization_bit`` (4 or 8; 0: not at all), else what the
    adapter's run trained on (its tnlora_run.yaml). The type and double quantization default to the run's when
    it used the same width, else NF4 with double quantization (LLaMA-Factory's defaults)."""
    from tnlora.model.quantization import Quantization

    recorded = run_cfg.quantization_bit if run_cfg is not None else None
    bits = recorded if quantization_bit is None else (quantization_bit or None)
    if bits is None:
        return None
    if bits not in (4, 8):
        raise TnloraError(f"--quantization_bit: 4, 8 or none; got {bits!r}")
    same = run_cfg is not None and recorded == bits
    kind = quantization_type or (run_cfg.quantization_type if same else "nf4")
    if kind not in ("nf4", "fp4"):
        raise TnloraError(f"--quantization_type: nf4 or fp4; got {kind!r}")
    double = double_quantization if double_quantization is not None else (run_cfg.double_quantization if same else True)
    return Quantization(bits, kind, double)


def load_for_inference(
    model: str | None = None,
    adapter: str | Path | None = None,
    *,
    template: str | None = None,
    system: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    attention_impl: str | None = None,
    graph_decoding: bool | None = None,
    merge_adapter: bool | None = False,
    quantization_bit: int | None = None,
    quantization_type: str | None = None,
    double_quantization: bool | None = None,
    dequantize: bool = False,
) -> InferenceModel:
    """Base model (``model`` or the adapter's recorded base) + LoRA adapter, tokenizer, template, system.

    ``graph_decoding`` (CUDA-graph decode steps, :func:`tnlora.infer.decode_graph.install_graph_decoding`)
    defaults to on exactly when the model runs on a GPU; an unmerged adapter is captured along with the base
    model. With
    ``merge_adapter`` the adapter is folded into the base weights once (peft's ``merge_and_unload``: the fp32
    product added to each weight and rounded once to its dtype, the weights ``tnlora merge`` exports): a
    decode step then runs the base model's kernels only, where an unmerged adapter adds four small kernels
    per adapted layer.

    A quantized base (``quantization_bit``, by default the adapter run's: :func:`inference_quantization`) is
    loaded onto the GPU with its linear layers quantized and the adapter kept unmerged: ``merge_adapter`` None
    means "merge unless the base is quantized", true on a quantized base is refused (folding the adapter into
    4-bit weights would round it away). With ``dequantize`` (``tnlora merge``) the quantized layers are turned
    back into plain ones on ``device`` in ``dtype`` (the weights the quantized base computes with) before the
    adapter is attached.
    """
    from tnlora.model.loading import load_base_model, peft_quietly
    from tnlora.model.quantization import check_quantization_available, dequantize_linears
    from tnlora.model.tokenizer import load_tokenizer

    adapter_path = Path(adapter) if adapter else None
    base, run_dir, run_cfg = base_model_of(model, adapter_path)
    quantization = inference_quantization(run_cfg, quantization_bit, quantization_type, double_quantization)
    if quantization is not None:
        recorded = quantization_bit is None
        where = f" (as the adapter's run trained: {run_dir / RUN_CONFIG_NAME})" if recorded and run_dir else ""
        check_quantization_available(
            "--quantization_bit", f"pass --quantization_bit none to load the base in bf16 / fp32 here{where}"
        )
        if merge_adapter and not dequantize:
            raise TnloraError(
                f"--merge_adapter: the base is quantized ({quantization.describe()}), and an adapter folded into "
                "its weights would be rounded away; leave the adapter unmerged (--merge_adapter false), or export a "
                "merged bf16 model with tnlora merge"
            )
    merge = (quantization is None) if merge_adapter is None else merge_adapter
    # The run's tokenizer first: it carries any tokens added for training.
    has_saved_tokenizer = run_dir is not None and (run_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(run_dir) if has_saved_tokenizer else base)
    tpl = load_template(run_dir, template)
    if system is None and run_cfg is not None:
        system = run_cfg.system
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    impl = attention_impl or (run_cfg.attention_impl if run_cfg else None)
    if quantization is None:
        net = load_base_model(base, dtype=torch_dtype, device=dev, attention_impl=impl or "auto")
    elif dequantize:
        # Quantized as training quantized it (bf16 weights, on the GPU), then back to plain layers on `dev`.
        net = load_base_model(base, device="cuda", attention_impl=impl or "auto", quantization=quantization)
        net = dequantize_linears(net, dev, torch_dtype)
    else:
        if dev.type != "cuda":
            raise TnloraError(f"--device: a quantized base ({quantization.describe()}) runs on a CUDA GPU, not {dev}")
        quantization = dataclasses.replace(quantization, compute_dtype=torch_dtype)
        net = load_base_model(base, device=dev, attention_impl=impl or "auto", quantization=quantization)
    if len(tokenizer) > net.get_input_embeddings().num_embeddings:
        net.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)  # as training did
    if adapter_path is not None:
        from peft import PeftModel

        with peft_quietly():
            net = PeftModel.from_pretrained(net, str(adapter_path))
        if merge:
            net = net.merge_and_unload()
    if quantization is None or dequantize:
        net.to(dev)  # a quantized model is where it was loaded, and bitsandbytes' 8-bit layers refuse .to()
    net.eval()
    if graph_decoding if graph_decoding is not None else dev.type == "cuda":
        from tnlora.infer.decode_graph import install_graph_decoding

        install_graph_decoding(net)  # CUDA graphs: steps on another device decode eagerly
    return InferenceModel(
        model=net,
        tokenizer=tokenizer,
        template=tpl,
        system=system,
        device=dev,
        base=base,
        adapter=adapter_path,
        run_config=run_cfg,
        quantization=quantization if not dequantize else None,
    )
