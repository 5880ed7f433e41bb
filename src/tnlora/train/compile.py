"""Regional compilation of the decoder layers for training, and its undoing for generation afterwards."""

from __future__ import annotations

import torch

# NormLinearAttention steps compiled per instance under checkpointing (instance attributes over the methods).
COMPILED_MIXER_STEPS = ("project", "output")


def compile_decoder_layers(
    model, *, checkpointing: bool = False, dynamic: bool | None = True, backend: str = "inductor"
) -> int:
    """Compile each decoder layer in place (``nn.Module.compile``) after LoRA is applied; returns the count.

    Regional compilation: the layers' many small elementwise ops and dtype casts (norms, LoRA adds, GLU,
    residuals) fuse into a few kernels, while the lightning attention is a compile boundary (it is wrapped in
    ``torch.compiler.disable``) and the embedding, loss, peft wrapper and Trainer stay eager. Not
    ``TrainingArguments(torch_compile=True)``: compiling the whole peft model graph-breaks all over. In-place
    compilation keeps parameter names (no ``_orig_mod.``), so checkpoints and adapters save as usual. Layers of
    the same structure share one compiled graph; ``dynamic=True`` makes batch and sequence length symbolic from
    the first compile, so batches of varying length do not recompile.

    The first layer stays eager (when there are others): its input, the embedding output, needs no grad under
    LoRA and in the official configs it is the only LRPE layer, so it would compile graphs of its own, about
    as long to compile as all the other layers' (7B: ~55 of ~110 s), for 1/L of their gain.

    With ``checkpointing`` the layer's sub-blocks (norms, the token mixer's projection and output, channel
    mixer) are compiled instead of the layer: newer transformers (5.24) put the checkpoint inside the layer's
    ``forward``, which dynamo then skips whole (nothing would be compiled), while a sub-block runs inside the
    checkpoint in every version.
    """
    from tnlora.train.lora import decoder_layers

    layers = decoder_layers(model)
    layers = layers[1:] if len(layers) > 1 else layers
    for layer in layers:
        if not checkpointing:
            layer.compile(dynamic=dynamic, backend=backend)
            continue
        for module in (layer.token_norm, layer.channel_norm, layer.channel_mixer):
            module.compile(dynamic=dynamic, backend=backend)
        # The layer calls its token mixer's steps, not its forward: compile the two around the attention.
        mixer = layer.token_mixer
        for step in COMPILED_MIXER_STEPS:
            setattr(mixer, step, torch.compile(getattr(mixer, step), dynamic=dynamic, backend=backend))
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Undo :func:`compile_decoder_layers`: generation after training (cache objects, one-token steps) runs
    eager. ``nn.Module.compile`` only sets ``_compiled_call_impl``; clearing it is the inverse (torch has no
    public call for it)."""
    from tnlora.train.lora import decoder_layers

    for layer in decoder_layers(model):
        for module in [layer, *layer.children()]:
            module._compiled_call_impl = None
        for step in COMPILED_MIXER_STEPS:
            vars(layer.token_mixer).pop(step, None)
