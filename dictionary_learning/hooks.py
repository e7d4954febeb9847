"""Where an activation lives in a model: hook points addressed by (layer, site), named like
SAELens/TransformerLens (`blocks.{L}.hook_{site}`), read and replaced through nnsight:

    resid_post  output of decoder layer L (the residual stream after the layer)
    resid_pre   input of decoder layer L  (= resid_post of layer L-1)
    mlp_out     what the MLP adds to the residual stream (Gemma-2: after post_feedforward_layernorm)
"""

from __future__ import annotations

import torch

SITES = ("resid_post", "resid_pre", "mlp_out")


# ---------------------------------------------------------------------------- hook points


def hook_name(layer: int, site: str = "resid_post") -> str:
    """(12, "resid_post") -> "blocks.12.hook_resid_post" (SAELens / TransformerLens naming)."""
    _check_site(site)
    return f"blocks.{int(layer)}.hook_{site}"


def _check_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose one of {SITES}")


def get_layers(model) -> list:
    """The decoder layers (nnsight envoys, or nn.Modules for a plain torch model), in order.

    Knows the Llama/SmolLM2/Gemma-2/Mistral/Qwen tree (model.model.layers), GPT-2
    (transformer.h) and Pythia/GPT-NeoX (gpt_neox.layers).
    """
    for path in (
        ("model", "layers"),
        ("transformer", "h"),
        ("gpt_neox", "layers"),
        ("model", "decoder", "layers"),
    ):
        obj = model
        try:
            for name in path:
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: known trees are "
        "model.layers (Llama, Gemma-2), transformer.h (GPT-2), gpt_neox.layers (Pythia)"
    )


def get_hook_module(model, layer: int, site: str = "resid_post"):
    """The envoy whose `.output` (resid_post, mlp_out) or `.input` (resid_pre) is the
    [batch, seq, d] activation at (layer, site). Read/replace it with hook_value / set_hook_value."""
    _check_site(site)
    layers = get_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(layers):
        raise ValueError(
            f"layer {layer!r} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})"
        )
    block = layers[layer]
    if site != "mlp_out":
        return block
    # Gemma-2/3 normalise the MLP output before adding it to the residual stream.
    for name in ("post_feedforward_layernorm", "mlp"):
        try:
            return getattr(block, name)
        except AttributeError:
            continue
    raise ValueError(f"layer {layer} of {type(model).__name__} has no `mlp` module")


def hook_value(envoy, site: str = "resid_post") -> torch.Tensor:
    """Inside an nnsight trace: the [batch, seq, d] activation at `envoy` (from get_hook_module).

    transformers 5 decoder layers return a plain tensor; older versions return a tuple
    whose first element is the hidden state: both are handled.
    """
    value = envoy.input if site == "resid_pre" else envoy.output
    return value[0] if isinstance(value, tuple) else value


def set_hook_value(envoy, site: str, value: torch.Tensor) -> None:
    """Inside an nnsight trace: replace the activation at `envoy` by `value` [batch, seq, d]."""
    if site == "resid_pre":
        envoy.input = value
        return
    out = envoy.output
    envoy.output = (value, *out[1:]) if isinstance(out, tuple) else value


def hook_points(model, layers: list[int], site: str) -> list[tuple[str, object]]:
    """[(hook_name, envoy)] sorted in execution order (nnsight reads values in order)."""
    _check_site(site)
    envoys = {L: get_hook_module(model, L, site) for L in layers}  # validates each layer
    return [(hook_name(L, site), envoys[L]) for L in sorted(envoys)]


@torch.no_grad()
def traced_forward(model, envoy, site: str, input_ids: torch.Tensor, replacement=None, stop_at_hook=False):
    """One traced forward pass on input_ids [B, T].

    replacement None: returns (activation [B, T, d], logits [B, T, V] or None when stop_at_hook).
    replacement [B, T, d]: the activation at the hook is replaced; returns (None, logits).
    """
    act = logits = None
    with model.trace(input_ids) as tracer:
        if replacement is not None:
            set_hook_value(envoy, site, replacement)
        else:
            act = hook_value(envoy, site).save()
            if stop_at_hook:
                tracer.stop()
        if not stop_at_hook:
            logits = model.output.logits.save()
    return act, logits
