"""Shared helpers of the lifelong-state tests (test_state, test_rollback, test_transactional,
test_long_run): a tiny random-init Llama, request streams, and exact snapshots of everything a
turn may change."""
import pytest
import torch

# Linear modules of different shapes (48 -> 32 and 32 -> 48): with a dozen multi-token targets
# the 32-wide up_proj gets N > d_in rows and takes the primal solve, the others the dual one.
MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj",
           "model.layers.2.mlp.down_proj"]  # model order

REQUESTS = [
    ("The capital of France is", "Rome"),
    ("The capital of Germany is", "Madrid, a large city"),
    ("The capital of Italy is", "Berlin"),
    ("The capital of Spain is", "Tokyo"),
    ("The capital city of Japan is", "Paris"),
    ("The official language of Peru is", "Japanese"),
    ("The currency of Japan is the", "euro"),
    ("Paris is in", "Japan and Peru"),
    ("Berlin is in", "Italy"),
    ("The capital of Peru is", "Rome is the capital"),
    ("The currency of Peru is the", "yen"),
    ("Rome is in", "France"),
    ("Tokyo is in", "Germany"),
]


def tiny_llama(vocab_size, dtype=torch.float32, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.to(dtype).eval()


def turn_requests(t, n=4):
    """The requests of turn ``t``: a rotating window over REQUESTS (deterministic)."""
    return [REQUESTS[(t * n + i) % len(REQUESTS)] for i in range(n)]


def snapshot(editor):
    """Everything a turn may change: model state dict, statistics, key memories, gradient
    covariances, turn count, Δ accumulators."""
    return {
        "model": {k: v.detach().clone() for k, v in editor.model.state_dict().items()},
        "stats": {k: {p: t.clone() for p, t in v.state_dict().items()}
                  for k, v in editor.stats.items()},
        "memory": {k: {p: t.clone() for p, t in v.state_dict().items()}
                   for k, v in editor.state.memory.items()},
        "whitening": {k: {p: t.clone() for p, t in v.state_dict().items()}
                      for k, v in editor.state.whitening.items()},
        "turns": editor.turns,
        "delta": {k: (None if v is None else v.clone()) for k, v in editor.journal.delta.items()},
    }


def assert_same(a, b):
    """Bit-identical (torch.equal, same dtypes) snapshots."""
    assert a["turns"] == b["turns"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        assert x.dtype == y.dtype and torch.equal(x, y), f"model tensor {k} differs"
    assert a["stats"].keys() == b["stats"].keys()
    for k in a["stats"]:
        for p in a["stats"][k]:
            assert torch.equal(a["stats"][k][p], b["stats"][k][p]), f"stats {k}.{p} differ"
    assert a["memory"].keys() == b["memory"].keys()
    for k in a["memory"]:
        for p in a["memory"][k]:
            assert torch.equal(a["memory"][k][p], b["memory"][k][p]), f"memory {k}.{p} differ"
    assert a["whitening"].keys() == b["whitening"].keys()
    for k in a["whitening"]:
        for p in a["whitening"][k]:
            assert torch.equal(a["whitening"][k][p], b["whitening"][k][p]), \
                f"gradient covariance {k}.{p} differs"
    assert a["delta"].keys() == b["delta"].keys()
    for k in a["delta"]:
        x, y = a["delta"][k], b["delta"][k]
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"delta {k}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a loaded, shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
