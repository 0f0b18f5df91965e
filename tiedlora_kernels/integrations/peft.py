"""Convert an HF PEFT LoRA or VeRA model into ours, with identical outputs and gradients (DoRA with
lora_dropout > 0 in training excepted: see :func:`from_peft`)."""

from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn as nn

from ..config import TiedLoRAConfig
from .inject import ROOT_ATTR, adapted_layers, base_in_out, check_rank_fits, embedding_pair, inject, read_by_parent


def from_peft(peft_model) -> nn.Module:
    """Turn a ``peft.PeftModel`` holding one LoRA or VeRA adapter into a plain model with our adapters.

    LoRA becomes the ``lora`` preset (untied A, B per layer, PEFT's scaling alpha/r or alpha/sqrt(r),
    PEFT's ``alpha_pattern`` carried over as the config's), or ``dora`` with ``use_dora=True``
    (PEFT's magnitude vector becomes m). Every layer's scaling comes from the returned model's
    config, so ``save_adapter`` / ``load_adapter`` rebuild the same function; a layer whose PEFT
    scaling was changed after creation (``set_scale``, ``scale_layer``) gets its own exact
    ``alpha_pattern`` entry.
    VeRA becomes the ``vera`` preset (PEFT's shared projections, sliced per kind as PEFT slices them
    per layer; lambda_d -> u, lambda_b -> v). The PEFT wrapper is consumed: its base model is
    returned with our modules in place of PEFT's.

    PEFT's ``modules_to_save`` (a classifier head that trains with the adapter; every sequence- or
    token-classification PEFT model has one) become plain trained modules of the returned model,
    PEFT's trained copies in place of the originals: :func:`export_peft` writes them back as
    ``modules_to_save``; :func:`save_adapter` does not hold them (it warns: save them separately).

    DoRA with ``lora_dropout > 0`` differs in training mode (identical in eval mode and in
    expectation): PEFT computes W x + (c - 1) W x_d + c s B A x_d with x_d the dropped-out input,
    ours c (W x + s B A x_d), dropout on the adapter's input only; a warning says so.

    Raises:
        TypeError: for anything but a ``peft.PeftModel`` (a plain model; its ``base_model``, a ``LoraModel``).
        ValueError: for adapters or settings without an exact equivalent (per-layer ranks,
            several adapters, non-linear layers, ``lora_bias``, LoRA variants other than DoRA,
            a layer scaling no alpha reproduces), naming the PEFT field.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTuner
    from peft.tuners.vera import VeraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(peft_model, PeftModel):
        hint = ""
        if isinstance(peft_model, BaseTuner):  # peft_model.base_model: it holds no record of the active adapter
            hint = (f"; a {type(peft_model).__name__} is the tuner inside a PeftModel: pass the PeftModel that "
                    "holds it")
        raise TypeError(f"from_peft: peft_model must be a peft.PeftModel holding one LoRA or VeRA adapter (from "
                        f"get_peft_model or PeftModel.from_pretrained), got {type(peft_model).__name__}{hint}")
    name = peft_model.active_adapter
    if not isinstance(name, str) or len(peft_model.peft_config) != 1:
        raise ValueError(f"from_peft: exactly one adapter is supported, the model has {sorted(peft_model.peft_config)} "
                         f"(active: {name!r}); delete the others first (peft_model.delete_adapter)")
    pcfg = peft_model.peft_config[name]
    init = getattr(pcfg, "init_lora_weights", True)
    if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "loftq")):
        # These rewrite the base weights too: no adapter file carries them (as modules_to_save below).
        raise ValueError(f"from_peft: LoraConfig.init_lora_weights={init!r} rewrites the base model's weights, "
                         "which a tiedlora adapter does not hold; convert it to a plain LoRA adapter of the original "
                         "base first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    # Trained tensors outside the adapter layers that are no whole module (a bias, token rows): no
    # module of ours holds them. Whole modules (modules_to_save) stay trained modules of the model.
    for field in ("trainable_token_indices", "bias"):
        value = getattr(pcfg, field, None)
        if value and value != "none":
            raise ValueError(f"from_peft: {type(pcfg).__name__}.{field}={value!r} trains base-model tensors, "
                             "which a tiedlora adapter does not hold; convert an adapter without it")
    root = peft_model.base_model.model
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, (LoraLayer, VeraLayer))]
    if not layers:
        raise ValueError("from_peft: the model has no PEFT LoRA or VeRA layers")
    kinds = {type(m) for _, m in layers}
    is_vera = all(isinstance(m, VeraLayer) for _, m in layers)
    if not is_vera and not all(isinstance(m, LoraLayer) for _, m in layers):
        raise ValueError(f"from_peft: mixed adapter layer types {kinds}")
    merged = [n for n, m in layers if m.merged]
    if merged:  # their base weights hold the update already: converted, it would be applied twice
        raise ValueError(f"from_peft: PEFT layers {merged[:3]}{' ...' if len(merged) > 3 else ''} are merged into "
                         "their base weights; call peft_model.unmerge_adapter() first")
    disabled = [n for n, m in layers if getattr(m, "disable_adapters", False)]
    if disabled:  # PEFT computes the base model there now; the adapter is what is asked for
        warnings.warn(f"from_peft: PEFT layers {disabled[:3]}{' ...' if len(disabled) > 3 else ''} have their "
                      "adapters disabled (disable_adapter_layers), so the PEFT model computes the base model there; "
                      "they are converted with their adapters on", UserWarning, stacklevel=2)
    captured = {}
    # Everything is checked before peft_model.unload(): after it, a refusal would leave the user
    # with neither PEFT's adapter nor ours.
    for n, m in layers:
        parent_name, _, child_name = n.rpartition(".")
        parent = root.get_submodule(parent_name)
        if read_by_parent(parent, child_name, m):
            raise ValueError(f"from_peft: layer {n!r} is read by its parent {type(parent).__name__} without being "
                             "called, so its adapter changes nothing (in PEFT too); convert an adapter without it")
        if getattr(m, "parameter_name", None) is not None:  # PEFT's target_parameters (ParamWrapper)
            raise ValueError(f"from_peft: layer {n!r} adapts the parameter {m.parameter_name!r} "
                             "(LoraConfig.target_parameters): its update is added to the weight as stored, "
                             "which is not a linear layer's update here; convert a target_modules adapter")
        check_rank_fits(n, *base_in_out(n, m.get_base_layer(), op="from_peft"), pcfg.r, op="from_peft")
        if is_vera:
            captured[n] = dict(u=m.vera_lambda_d[name].detach(), v=m.vera_lambda_b[name].detach(),
                               A=m.vera_A[name].detach(), B=m.vera_B[name].detach())
        else:
            if m.lora_B[name].bias is not None:
                raise ValueError(f"from_peft: layer {n!r} has a bias on lora_B (LoraConfig.lora_bias=True), "
                                 "which has no equivalent here")
            variant = getattr(m, "lora_variant", {}).get(name)
            if variant is not None and not isinstance(variant, DoraLinearVariant):
                raise ValueError(f"from_peft: layer {n!r} uses PEFT's {type(variant).__name__} (a LoraConfig "
                                 "option other than use_dora), which has no equivalent here")
            captured[n] = dict(A=m.lora_A[name].weight.detach(), B=m.lora_B[name].weight.detach(),
                               scaling=float(m.scaling[name]))
            if m.use_dora.get(name, False):
                captured[n]["m"] = m.lora_magnitude_vector[name].weight.detach()
            if captured[n]["A"].shape[0] != pcfg.r:
                raise ValueError(f"from_peft: layer {n!r} has rank {captured[n]['A'].shape[0]} != r={pcfg.r} "
                                 "(per-layer ranks, LoraConfig.rank_pattern, are not supported)")
    dropout = float(getattr(pcfg, "vera_dropout" if is_vera else "lora_dropout", 0.0) or 0.0)
    dora = {"m" in t for t in captured.values()}
    if len(dora) > 1:
        raise ValueError("from_peft: some layers use DoRA and some do not")
    if dora == {True} and dropout > 0:
        warnings.warn(f"from_peft: DoRA with lora_dropout={dropout}: in training mode PEFT applies the magnitude's "
                      "base term to the dropped-out input (W x + (c - 1) W x_d + c s B A x_d), tiedlora to the whole "
                      "input (c (W x + s B A x_d)); outputs agree in eval mode and in expectation, not per step",
                      UserWarning, stacklevel=2)
    rslora = bool(getattr(pcfg, "use_rslora", False))

    def make_config(alpha_pattern: dict) -> TiedLoRAConfig:
        return TiedLoRAConfig(
            rank=pcfg.r, preset="vera" if is_vera else ("dora" if dora == {True} else "lora"), dropout=dropout,
            target_modules="|".join(re.escape(n) for n, _ in layers), exclude_modules=[],
            alpha=None if is_vera else float(pcfg.lora_alpha), rslora=rslora, alpha_pattern=alpha_pattern,
        )

    alpha_pattern = {} if is_vera else {k: float(v) for k, v in (pcfg.alpha_pattern or {}).items()}
    config = make_config(alpha_pattern)
    if not is_vera:
        # PEFT's live scaling is the truth; a layer that the patterns do not reproduce (its scale set
        # after creation) gets an exact entry, matched before PEFT's own patterns.
        odd = {n: t["scaling"] for n, t in captured.items() if config.layer_scaling(n) != t["scaling"]}
        if odd:
            denom = math.sqrt(pcfg.r) if rslora else pcfg.r
            config = make_config({**{"^" + re.escape(n): s * denom for n, s in odd.items()}, **alpha_pattern})
        for n, t in captured.items():
            if not math.isclose(config.layer_scaling(n), t["scaling"], rel_tol=1e-12, abs_tol=0.0):
                raise ValueError(f"from_peft: layer {n!r} has scaling {t['scaling']!r}, which no alpha reproduces "
                                 f"(lora_alpha={pcfg.lora_alpha}, alpha_pattern={pcfg.alpha_pattern})")
    # PEFT's copies of its modules_to_save (frozen when PEFT loaded the adapter for inference): they
    # take their modules' places in unload() and train with the adapter, as inject makes it trainable.
    heads = [prm for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)
             for prm in m.modules_to_save[name].parameters()]
    base = peft_model.unload()
    _untie_in_config_where_untied(base)
    heads += [prm for prm in base.parameters() if prm.requires_grad]  # anything else PEFT trained
    inject(base, config)
    for prm in heads:  # inject froze them with the base model: they train as they did in PEFT
        prm.requires_grad_(True)
    ours = dict(adapted_layers(base))
    with torch.no_grad():
        for n, t in captured.items():
            layer = ours[n]
            f = layer.factors
            if is_vera:
                # One frozen pair per kind, as large as its largest layer: PEFT's leading slices.
                f.A.copy_(t["A"][:, : f.A.shape[1]])
                f.B.copy_(t["B"][: f.B.shape[0], :])
                layer.adapter_u.copy_(t["u"])
                layer.adapter_v.copy_(t["v"])
            else:
                f.A.copy_(t["A"])
                f.B.copy_(t["B"])
                if "m" in t:
                    layer.adapter_m.copy_(t["m"])
    getattr(base, ROOT_ATTR).config = config
    return base


def _untie_in_config_where_untied(model: nn.Module) -> None:
    """A module to save that was tied to another (PEFT's trained copy of ``lm_head``, which was the input
    embedding's weight) is its own tensor once PEFT unloads: set the config's ``tie_word_embeddings``
    to False, or ``tie_weights()`` (``save_pretrained`` then ``from_pretrained``, resizing the vocabulary)
    would tie them again and silently drop the trained head."""
    pair, config = embedding_pair(model), getattr(model, "config", None)
    if pair is None or config is None or pair[0].weight is pair[1].weight:
        return
    configs = [config, *([config.get_text_config()] if hasattr(config, "get_text_config") else [])]
    if not any(getattr(c, "tie_word_embeddings", False) for c in configs):
        return
    for c in configs:
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    warnings.warn("from_peft: the PEFT model's modules_to_save copy untied the output head from the input "
                  "embedding: the model's config now says tie_word_embeddings=False, so tie_weights() (saving and "
                  "reloading, resizing the vocabulary) keeps the trained head", UserWarning, stacklevel=3)
