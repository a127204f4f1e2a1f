"""Prototype: generic text's keys in every edited module's prior, against the drift of what the
model says (WILD-style locality).

The editor's update of a module solves with the prior ``P = νM + μK_pᵀK_p + λI`` (key memory,
preserved subjects' keys, ridge; ``ultraedit.solver.module_prior``). This adds one term, the
second moment of the module's inputs over generic text::

    P' = P + w R C_g,   C_g = K_gᵀK_g / T

``K_g`` (T x d_in): the module's inputs at every token of the generic prompts
(``ultraedit.preserve.GENERIC_PROMPTS``: nothing of the evaluated tables) followed by the
unedited model's own greedy continuation of ``--new-tokens`` tokens, captured once when the
editor is built; ``R`` (``--rows``) counts it as that many preserved rows, ``w`` is
``--weight``. Why: WILD-style locality judges the whole decoded answer, and after 1,000 edits
most answers change after the fact they name (experiments/locality.md); an update that leaves
the outputs of generic tokens' keys alone should leave more of the free continuation as it
was. The earlier argument against such a covariance (tuning.md: it does not separate a subject
from its neighbours) concerned paraphrases and neighbours, not this drift.

Everything after ``--`` is an ``ultraedit run`` command line (the same stream, scores and JSON
as any run); the editor is monkey-patched here, nothing of it ships::

    PYTHONPATH=python python experiments/generic_prior.py --weight 1 -- --data offline \\
        --split report --turns 10 --edits-per-turn 100 ... --json OUT.json
"""
import argparse
import sys

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

import ultraedit.editor as editor_mod
from ultraedit.solver import Prior

GENERIC = {}        # module name -> C_g (d_in x d_in, float64), of the unedited model
SETTINGS = {"weight": 0.0, "rows": 400.0, "new_tokens": 48}
_module_prior = editor_mod.module_prior
_init = editor_mod.UltraEditor.__init__


def generic_second_moments(model, tokenizer, modules, new_tokens):
    """``{name: K_gᵀK_g / T}`` of each module's inputs over the generic prompts and the model's
    own continuations of them (special prefix left out)."""
    from ultraedit.eval.probing import greedy_continuations
    from ultraedit.preserve import GENERIC_PROMPTS
    from ultraedit.tokenization import encode_request, special_prefix

    prefix = special_prefix(tokenizer)
    prompts = [encode_request(tokenizer, p, "x", prefix)[0] for p in GENERIC_PROMPTS]
    conts = greedy_continuations(model, tokenizer, prompts, new_tokens)
    sums = {name: None for name in modules}
    count = 0
    store = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, inp, name=name: store.__setitem__(name, inp[0][0].detach().double()))
        for name, m in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for p, c in zip(prompts, conts):
                model(input_ids=torch.tensor([p + list(c)], device=device))
                for name in modules:
                    k = store[name][len(prefix):]
                    g = k.T @ k
                    sums[name] = g if sums[name] is None else sums[name] + g
                count += store[next(iter(modules))].shape[0] - len(prefix)
    finally:
        for h in handles:
            h.remove()
    return {name: s / count for name, s in sums.items()}, count


def patched_init(self, model, tokenizer, config=None, **overrides):
    _init(self, model, tokenizer, config, **overrides)
    moments, tokens = generic_second_moments(model, tokenizer, self.modules,
                                             SETTINGS["new_tokens"])
    GENERIC.update(moments)
    print(f"generic prior: {tokens} tokens, weight {SETTINGS['weight']} x {SETTINGS['rows']} "
          f"rows, {len(moments)} modules", file=sys.stderr, flush=True)


def patched_prior(state, name, config, subjects):
    """``module_prior``'s terms plus ``w R C_g`` (see the module docstring)."""
    if SETTINGS["weight"] <= 0 or name not in GENERIC:
        return _module_prior(state, name, config, subjects)
    memory = state.memory.get(name) if config.memory > 0 else None
    pk = state.preserved.get(name) if config.preserve > 0 else None
    terms = [(None if memory is None else memory.gram, config.memory),
             (None if pk is None else pk.gram_without(subjects), config.preserve),
             (GENERIC[name], SETTINGS["weight"] * SETTINGS["rows"])]
    return Prior(terms, config.ridge)


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: generic_prior.py [--weight W] [--rows R] [--new-tokens T] -- "
                         "<ultraedit run arguments>")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--rows", type=float, default=400.0)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args(argv[:cut])
    SETTINGS.update(weight=args.weight, rows=args.rows, new_tokens=args.new_tokens)
    editor_mod.module_prior = patched_prior
    editor_mod.UltraEditor.__init__ = patched_init
    from ultraedit.cli import main as cli_main
    return cli_main(["run"] + argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
