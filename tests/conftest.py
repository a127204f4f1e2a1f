"""Shared pytest fixtures. Each part of the project keeps its fixtures in its own section."""

# ---------------------------------------------------------------------------------------------
# Editor fixtures (python/ultraedit): tiny offline tokenizers and random-init models.
# ---------------------------------------------------------------------------------------------
import os as _ue_os
import sys as _ue_sys

import pytest as _ue_pytest

_ue_os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the preserved-key cache stays off unless a test points it at its own folder
_ue_os.environ.setdefault("ULTRAEDIT_PRESERVED_CACHE", "off")
# Backend: the tests never measure the machine; `auto` uses the PyTorch reference unless a
# test loads a calibration fixture (tests/test_calibration.py) or forces a backend.
_ue_os.environ.setdefault("ULTRAEDIT_CALIBRATION", "off")
# transformers gives its logger a handler on the sys.stderr of the moment it is first used; made
# inside a test that captures stderr (capsys), it would write to a closed stream in later tests
try:
    from transformers.utils import logging as _ue_hf_logging

    _ue_hf_logging.get_logger("transformers")
except ImportError:   # the kernels without the editor's dependencies
    pass
_UE_ROOT = _ue_os.path.dirname(_ue_os.path.dirname(_ue_os.path.abspath(__file__)))
for _ue_p in (_UE_ROOT, _ue_os.path.join(_UE_ROOT, "python")):
    if _ue_p not in _ue_sys.path:
        _ue_sys.path.insert(0, _ue_p)

UE_CORPUS = [
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of Italy is Rome.",
    "The capital of Spain is Madrid.",
    "The capital city of Japan is Tokyo, a large city.",
    "Paris is in France and Berlin is in Germany.",
    "The official language of Peru is Spanish.",
    "The currency of Japan is the yen.",
]


def ue_make_tokenizer(with_bos=True):
    """A small byte-level BPE tokenizer trained on UE_CORPUS (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(UE_CORPUS, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   model_max_length=64)
    return fast


@_ue_pytest.fixture(scope="session")
def ue_tokenizer():
    return ue_make_tokenizer(with_bos=True)


@_ue_pytest.fixture
def ue_padded_tokenizer():
    """A fresh tokenizer with ``<pad>`` as its pad token, for tests that pad batches themselves
    (the shared ``ue_tokenizer`` has none: the editor's own fallback to EOS is tested on it)."""
    tok = ue_make_tokenizer(with_bos=True)
    tok.pad_token = "<pad>"
    return tok


@_ue_pytest.fixture(scope="session")
def ue_tokenizer_nobos():
    return ue_make_tokenizer(with_bos=False)


def ue_tiny_model(kind, vocab_size, seed=0, intermediate=48, attn="eager"):
    """A random-init causal LM from a config: 'llama', 'gpt2' (Conv1D) or 'gptj'; ``attn``: its
    attention implementation."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=False, **ids)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                            **ids)
    elif kind == "gptj":
        cfg = tf.GPTJConfig(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                            rotary_dim=4, **ids)
    else:
        raise ValueError(kind)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.float().eval()


@_ue_pytest.fixture(scope="session")
def ue_embedded():
    """The embedded SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once per session.

    Tests must restore any weight they edit (see ``ue_restore``)."""
    import torch

    from ultraedit.models import load_model

    # one thread: on a CPU shared with other jobs, 2 OpenMP threads run ~10x slower
    torch.set_num_threads(1)
    return load_model("default")


@_ue_pytest.fixture
def ue_restore():
    """Call with ``(model, [module names])``; restores those modules' weights after the test."""
    saved = []

    def remember(model, names):
        named = dict(model.named_modules())
        for n in names:
            saved.append((named[n].weight, named[n].weight.detach().clone()))

    yield remember
    import torch

    with torch.no_grad():
        for w, orig in saved:
            w.copy_(orig)
# ------------------------------------------------------------------ end of editor fixtures ----


# ---------------------------------------------------------------------------------------------
# Data and metrics fixtures (python/ultraedit/data, python/ultraedit/eval).
# ---------------------------------------------------------------------------------------------
def data_bigram_lm(tokenizer, pairs):
    """A deterministic causal 'LM' whose next-token argmax depends only on the current token:
    it continues every bigram of ``prompt_ids + target_ids`` (as ``encode_request`` tokenizes
    each ``(prompt, target)`` of ``pairs``; later pairs win on conflicts); other tokens predict
    id 0. Has ``forward(input_ids, attention_mask, ...) -> .logits (B, L, V)`` and accepts (and
    ignores) a KV cache, so teacher-forced and greedy metrics know exactly its answers."""
    import types

    import torch

    from ultraedit.tokenization import encode_request

    vocab = len(tokenizer)
    table = torch.zeros(vocab, vocab)
    for prompt, target in pairs:
        p_ids, t_ids = encode_request(tokenizer, prompt, target)
        ids = p_ids + t_ids
        for a, b in zip(ids, ids[1:]):
            table[a] = 0.0
            table[a, b] = 1.0

    class BigramLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(table, requires_grad=False)

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                    use_cache=None, **kwargs):
            return types.SimpleNamespace(logits=self.table[input_ids], cache=None)

    return BigramLM().eval()
# ------------------------------------------------------------------ end of data fixtures ------
