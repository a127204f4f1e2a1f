"""Which architectures pass the packing check (``ultraedit.packing.probe``).

Builds a tiny random-init causal LM of each architecture from a config (sdpa attention) and runs
the check that decides ``pack="auto"``: a packed forward of two random sequences must give the
hidden states of their padded forward. Prints and writes ``{architecture: reason or None}``.
With ``--real-models``, also one paper's-settings turn (``EditConfig.paper(lr=1e-4)``, the first
30 report edits, one thread) on the embedded model and on Gemma 3 270M (``load_model``; the
latter needs ``python -m ultraedit.models fetch --model gemma3-270m``), padded and packed, and
the relative difference of their updates (largest over modules).

    PYTHONPATH=.:python python experiments/packing_architectures.py --real-models \
        --json experiments/results/packing_architectures.json
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "python"), os.path.join(_ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import write_results  # noqa: E402  (bench/_common.py: bench is first on sys.path)


def configs():
    import transformers as tf

    small = dict(vocab_size=128)
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **small)
    return {
        "llama": tf.LlamaConfig(**llama_like),
        "mistral": tf.MistralConfig(**llama_like),
        "qwen2": tf.Qwen2Config(**llama_like),
        "qwen3": tf.Qwen3Config(head_dim=8, **llama_like),
        "gemma3_text": tf.Gemma3TextConfig(head_dim=8, **llama_like),
        "phi3": tf.Phi3Config(pad_token_id=0, **llama_like),
        "olmo2": tf.Olmo2Config(**llama_like),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, **small),
        "gptj": tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, **small),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, **small),
        "opt": tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=32, **small),
        "falcon": tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  **small),
    }


def real_model_turns(name: str, edits: int = 30):
    """One paper's-settings turn of ``name`` padded and packed: ``{packed, max_rel_diff}``."""
    from ultraedit import EditConfig, UltraEditor
    from ultraedit.data import offline_facts
    from ultraedit.models import load_model

    reqs = [{"prompt": r.prompt, "target": r.target}
            for r in offline_facts(split="report")[:edits]]
    deltas, packed = {}, {}
    for pack in ("off", "auto"):
        model, tok = load_model(name)
        editor = UltraEditor(model, tok, config=EditConfig.paper(lr=1e-4, pack=pack))
        base = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
        packed[pack] = editor.edit(reqs).packed
        deltas[pack] = {n: (m.weight.detach() - base[n]).double()
                        for n, m in editor.modules.items()}
    diff = max(float((deltas["auto"][n] - deltas["off"][n]).norm() / deltas["off"][n].norm())
               for n in deltas["off"])
    return {"edits": edits, "packed": packed["auto"], "max_rel_diff": diff}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real-models", action="store_true",
                   help="also a turn on the embedded model and Gemma 3 270M, padded and packed")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch
    import transformers as tf
    from ultraedit.packing import probe

    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    out = {"transformers": tf.__version__, "torch": torch.__version__, "probe": {}}
    for name, cfg in configs().items():
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        out["probe"][name] = probe(model)
        print(f"{name}: {out['probe'][name] or 'packs'}")
    if a.real_models:
        torch.set_num_threads(1)
        out["turns"] = {name: real_model_turns(name) for name in ("default", "gemma3-270m")}
        print(out["turns"])
    write_results(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
