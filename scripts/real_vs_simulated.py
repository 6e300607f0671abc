"""Real backend against simulated on a saved quantized model, three ways:

1. per layer: every QuantLinear and its RealQuantLinear on the same captured input
   (relative output difference; should be float rounding, or one code flip);
2. whole model: logits and NLL of the first --tokens WikiText-2 tokens, both backends;
3. the simulated model's own sensitivity: the same, with 1e-6 relative noise on the input
   embeddings. If (2) is no larger than (3), a perplexity gap between the backends is the
   model amplifying float rounding, not a kernel error.

    python scripts/real_vs_simulated.py DIR --data-dir ../shared/data [--tokens 1024] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoTokenizer

from duquant.checkpoint import load_quantized
from duquant.data.datasets import load_text
from duquant.modeling.qlinear import QuantLinear
from duquant.modeling.real_linear import RealQuantLinear, supports_real, to_real_backend


def captured_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return inputs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    model, config, _ = load_quantized(args.model, args.device, None)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(load_text("wikitext2", "test", args.data_dir), return_tensors="pt").input_ids[:, :args.tokens]
    ids = ids.to(args.device)
    print(f"{config.describe()}, {args.tokens} WikiText-2 tokens, {args.device}")

    per_layer = []
    for name, x in captured_inputs(model, ids[:, :256]).items():
        layer = model.get_submodule(name)
        if supports_real(layer):
            with torch.no_grad():
                per_layer.append((rel(RealQuantLinear(layer)(x), layer(x)), name))
    per_layer.sort(reverse=True)
    print(f"1. per layer ({len(per_layer)} linears): median {per_layer[len(per_layer) // 2][0]:.2e}, "
          f"worst {per_layer[0][0]:.2e} ({per_layer[0][1]})")

    real = copy.deepcopy(model)
    to_real_backend(real)
    emb = model.get_input_embeddings()(ids)
    noisy = emb * (1 + 1e-6 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)).to(emb))
    with torch.no_grad():
        sim, rl, sim_noisy = (m(inputs_embeds=e).logits for m, e in ((model, emb), (real, emb), (model, noisy)))
    print(f"2. real vs simulated: logits differ by {rel(rl, sim):.3f} (relative), NLL {nll(sim, ids):.4f} -> "
          f"{nll(rl, ids):.4f}")
    print(f"3. simulated with 1e-6 input noise: logits differ by {rel(sim_noisy, sim):.3f}, NLL {nll(sim, ids):.4f} -> "
          f"{nll(sim_noisy, ids):.4f}")


if __name__ == "__main__":
    main()
