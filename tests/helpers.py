"""Shared test utilities: tiny models built from configs, and the relative-error metric."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def tiny_gpt2(n_layer=2, n_embd=32, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=97, n_positions=64,
                     bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(n_layer=2, hidden=32, family="llama", **kw):
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
    cfg = getattr(transformers, cls[0])(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden + 6,
                                         num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=0, **kw)
    return getattr(transformers, cls[1])(cfg).eval()


def randomize_adapters(model, std=0.1, seed=1):
    """Give every trained adapter tensor random values so the adapter path is non-trivial."""
    from tiedlora_kernels import adapter_named_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * std)


def load_quantized(path, bits: int):
    """The transformers checkpoint at ``path`` loaded as users load a QLoRA base: bitsandbytes 4-bit (NF4,
    fp32 compute) or 8-bit linear layers, on the CPU (as loaded: in eval mode)."""
    import warnings

    import transformers

    cfg = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32) if bits == 4
           else transformers.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu",
                                                                 dtype=torch.float32)

