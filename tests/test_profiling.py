import torch

from ultraedit_kernels import _profiling
from ultraedit_kernels._profiling import nvtx_enabled, nvtx_range
import ultraedit_kernels as uk
from fp64_reference import realistic_features


def test_nvtx_is_off_without_cuda():
    if not torch.cuda.is_available():
        assert nvtx_enabled() is False


def test_decorator_returns_value():
    @nvtx_range("ultraedit/test")
    def f(x):
        return x + 1

    assert f(2) == 3


def test_ranges_show_in_profiler_trace():
    keys, grads = realistic_features(9, 17, 5)
    stats = uk.RunningStats(22).update(torch.cat([keys, grads], 1))
    with torch.profiler.profile() as prof:
        uk.shift_factors(keys, grads, stats)
    names = {e.name for e in prof.events()}
    assert {"ultraedit/pseudo_values", "ultraedit/gram", "ultraedit/solve"} <= names


def test_refresh_rereads_environment(monkeypatch):
    monkeypatch.setenv(_profiling.ENV_VAR, "1")
    _profiling.refresh()
    assert nvtx_enabled() == torch.cuda.is_available()
    monkeypatch.delenv(_profiling.ENV_VAR)
    _profiling.refresh()
    assert nvtx_enabled() is False


def test_editor_stages_show_in_profiler_trace(ue_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    from ultraedit import UltraEditor

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(ue_tokenizer), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    editor = UltraEditor(model, ue_tokenizer, modules=["model.layers.1.mlp.down_proj"], lr=1e-3)
    with torch.profiler.profile() as prof:
        editor.edit([("The capital of France is", "Rome")])
    names = {e.name for e in prof.events()}
    assert {"ultraedit/capture", "ultraedit/stats", "ultraedit/apply", "ultraedit/solve"} <= names
