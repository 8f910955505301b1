"""The tiny random Llama family the integration tests share (how mergekit's own tests build
their models): a base saved as safetensors with transformers, and fine-tunes that add Gaussian
noise to it, each saved next to it as ``base/`` and ``ft{i}/``."""
import copy


def save_family(root, *, vocab_size: int, n_ft: int = 3, noise=lambda i: 0.02, linear_only: bool = False):
    """Writes root/base and root/ft0..ft{n_ft-1}; returns (base model, [fine-tuned models]) in eval mode.
    Fine-tune i adds ``noise(i) * N(0, 1)`` to every parameter, or only to the nn.Linear weights
    (what DeltaLinear serves) with linear_only."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    fts = []
    for i in range(n_ft):
        m = copy.deepcopy(base)
        params = ([mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)] if linear_only
                  else list(m.parameters()))
        with torch.no_grad():
            for p in params:
                p.add_(noise(i) * torch.randn_like(p))
        m.save_pretrained(str(root / f"ft{i}"), safe_serialization=True)
        fts.append(m)
    return base, fts
