"""encode_edit_batch: layout of input_ids/labels, BOS handling, padding, errors."""
import pytest
import torch

from ultraedit.tokenization import encode_edit_batch, encode_request


@pytest.mark.parametrize("fixture", ["ue_tokenizer", "ue_tokenizer_nobos"])
def test_layout_labels_are_next_tokens(fixture, request):
    tok = request.getfixturevalue(fixture)
    prompts = ["The capital of France is", "The currency of Japan is the"]
    targets = ["Berlin", " yen and more"]
    batch = encode_edit_batch(tok, prompts, targets)
    ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == att.shape == lab.shape and ids.dtype == torch.long
    for b, (p, t) in enumerate(zip(prompts, targets)):
        p_ids, t_ids = encode_request(tok, p, t)
        n = len(p_ids) + len(t_ids) - 1
        assert att[b, :n].tolist() == [1] * n and att[b, n:].sum() == 0
        assert ids[b, :len(p_ids)].tolist() == p_ids
        answer = (lab[b] != -100).nonzero().flatten().tolist()
        assert answer == list(range(len(p_ids) - 1, n))          # answer positions, no padding
        assert lab[b, answer].tolist() == t_ids
        # position t predicts token t+1 (inside the input)
        for t_pos in answer[:-1]:
            assert lab[b, t_pos] == ids[b, t_pos + 1]
        # the answer decodes to the target with one leading space
        assert tok.decode(t_ids) == " " + t.lstrip(" ")


def test_bos_present_only_when_tokenizer_adds_it(ue_tokenizer, ue_tokenizer_nobos):
    bos = ue_tokenizer.bos_token_id
    with_bos = encode_edit_batch(ue_tokenizer, ["The capital of Italy is"], ["Rome"])
    without = encode_edit_batch(ue_tokenizer_nobos, ["The capital of Italy is"], ["Rome"])
    assert with_bos["input_ids"][0, 0] == bos
    assert without["input_ids"][0, 0] != bos
    assert with_bos["input_ids"].shape[1] == without["input_ids"].shape[1] + 1


def test_pad_falls_back_to_eos(ue_tokenizer):
    assert ue_tokenizer.pad_token_id is None
    batch = encode_edit_batch(ue_tokenizer, ["The capital of Italy is", "The capital city of Japan is"],
                              ["Rome", "Tokyo, a large city"])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == ue_tokenizer.eos_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_device_argument(ue_tokenizer):
    batch = encode_edit_batch(ue_tokenizer, ["The capital of Italy is"], ["Rome"], device="cpu")
    assert all(v.device.type == "cpu" for v in batch.values())


@pytest.mark.parametrize("prompt,target,match", [
    ("", "Rome", "empty prompt"),
    ("   ", "Rome", "empty prompt"),
    ("The capital of Italy is", "", "empty target"),
    ("The capital of Italy is", "  ", "empty target"),
])
def test_empty_inputs_raise(ue_tokenizer, prompt, target, match):
    with pytest.raises(ValueError, match=match):
        encode_edit_batch(ue_tokenizer, [prompt], [target])


def test_too_long_raises(ue_tokenizer):
    long_prompt = " ".join(["The capital of France is Paris."] * 20)
    with pytest.raises(ValueError, match="longer than the model's context"):
        encode_edit_batch(ue_tokenizer, [long_prompt], ["Rome"])
    with pytest.raises(ValueError, match="context of 5 tokens"):
        encode_edit_batch(ue_tokenizer, ["The capital of Italy is"], ["Rome"], max_length=5)


def test_length_mismatch_and_empty_batch(ue_tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        encode_edit_batch(ue_tokenizer, ["a b", "c d"], ["x"])
    with pytest.raises(ValueError, match="no edit requests"):
        encode_edit_batch(ue_tokenizer, [], [])


def test_target_that_tokenizes_to_nothing():
    class NullTok:
        model_max_length = 100
        pad_token_id = 0
        def __call__(self, text, add_special_tokens=True):
            # words become ids; a zero-width joiner tokenizes to nothing
            return {"input_ids": [len(w) for w in text.split() if w != "\u200d"]}
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        encode_edit_batch(NullTok(), ["The capital is"], ["\u200d"])
