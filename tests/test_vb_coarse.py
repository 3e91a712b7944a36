"""vb coarse path: image encoder layers, mapper, subject-token replacement with the CLIP
tokenizers of transformers and open_clip, and the prompt encoding around it."""
import open_clip
import pytest
import torch

import vb
from vb.coarse import end_token_id, tokenize


@pytest.fixture(scope="module")
def parts():
    return vb.build_tiny_videobooth("dit")


@pytest.fixture(scope="module")
def oc_tokenizer():
    return open_clip.SimpleTokenizer()


@pytest.fixture(params=["transformers", "open_clip"])
def tokenizer(request, parts, oc_tokenizer):
    return parts.tokenizer if request.param == "transformers" else oc_tokenizer


def test_both_tokenizers_agree_on_prompt_ids(parts, oc_tokenizer):
    prompt = "A corgi teddybear running on the beach!"
    a = tokenize(parts.tokenizer, [prompt], 77)[0]
    b = tokenize(oc_tokenizer, [prompt], 77)[0]
    n = int((a == end_token_id(parts.tokenizer)).nonzero()[0]) + 1  # padding differs: 49407 vs 0
    assert torch.equal(a[:n], b[:n])
    assert vb.word_token_ids(parts.tokenizer, "teddybear") == vb.word_token_ids(oc_tokenizer, "teddybear")


@pytest.mark.parametrize("prompt,word", [
    ("a dog running on the grass", "dog"),
    ("a photo of a Teddybear, in the snow", "teddybear"),   # multi-token word, case, punctuation
    ("dog", "dog"),                                          # word is the whole prompt
])
def test_subject_span_is_found_and_replaced_with_shift(tokenizer, prompt, word):
    ids = tokenize(tokenizer, [prompt], 77)[0]
    wid = vb.word_token_ids(tokenizer, word)
    s, e = vb.find_subject_span(ids.tolist(), wid)
    assert ids[s:e].tolist() == wid
    k = 3
    inj = vb.inject_subject_ids(ids, wid, k, end_token_id(tokenizer), prompt, word)
    new = inj.input_ids
    assert new.shape == ids.shape and (inj.start, inj.count) == (s, k)
    assert torch.equal(new[:s], ids[:s])
    assert torch.equal(new[s + k:], ids[e:e + len(ids) - s - k])  # the rest shifted by k - (e - s)
    eos = end_token_id(tokenizer)
    assert (new == eos).nonzero()[0].item() == (ids == eos).nonzero()[0].item() + k - (e - s)


def test_truncation_keeps_the_end_token(tokenizer):
    prompt = "a dog " + " ".join(["on the grass"] * 30)  # far more than 77 tokens
    ids = tokenize(tokenizer, [prompt], 77)[0]
    eos = end_token_id(tokenizer)
    inj = vb.inject_subject_ids(ids, vb.word_token_ids(tokenizer, "dog"), 5, eos, prompt, "dog")
    assert inj.input_ids.shape == (77,)
    assert inj.input_ids[-1].item() == eos and (inj.input_ids == eos).sum() == 1
    assert inj.count == 5


def test_missing_subject_word_is_a_value_error_naming_it(parts, tokenizer):
    tokens = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match=r"subject_word: 'cat'.*a dog on the grass"):
        vb.encode_prompt(parts.text_encoder, tokenizer, "a dog on the grass", "cat", tokens)
    with pytest.raises(ValueError, match="subject_word: 'dog'"):  # plural is another token
        vb.encode_prompt(parts.text_encoder, tokenizer, "two dogs", "dog", tokens)
    with pytest.raises(ValueError, match="subject_word"):
        vb.encode_prompt(parts.text_encoder, tokenizer, ["a dog", "a cat"], ["dog"] * 3, torch.randn(2, 3, 32))
    with pytest.raises(TypeError, match="tokenizer"):
        vb.encode_prompt(parts.text_encoder, object(), "a dog", "dog", tokens)


def test_injected_prompt_embedding(parts, tokenizer):
    te = parts.text_encoder
    prompts, words = ["a photo of a dog on the beach", "my teddybear sits"], ["dog", "teddybear"]
    tokens = torch.randn(2, 3, 32, requires_grad=True)
    hidden, pooled = vb.encode_prompt(te, tokenizer, prompts, words, tokens)
    plain, plain_pooled = vb.encode_prompt(te, tokenizer, prompts)
    assert hidden.shape == (2, 77, 32) and pooled.shape == (2, 32)
    for b, (p, w) in enumerate(zip(prompts, words)):
        ids = tokenize(tokenizer, [p], 77)[0]
        s, _ = vb.find_subject_span(ids.tolist(), vb.word_token_ids(tokenizer, w))
        # CLIP's text model is causal: tokens before the subject do not see the injection.
        torch.testing.assert_close(hidden[b, :s], plain[b, :s], rtol=0, atol=1e-6)
        assert not torch.allclose(hidden[b, s:s + 3], plain[b, s:s + 3])
    assert not torch.allclose(pooled, plain_pooled)
    # The mapped tokens get gradients (stage-1 training trains the mapper through this).
    # (not .sum(): a layer-normed vector with unit gain sums to a constant)
    (pooled * torch.randn_like(pooled)).sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    # The hook is removed afterwards: a plain call is plain again.
    again, _ = vb.encode_prompt(te, tokenizer, prompts)
    assert torch.equal(again, plain)


def test_image_encoder_layers_and_mapper(parts):
    enc, mapper = parts.image_encoder, parts.mapper
    images = torch.rand(2, 3, 40, 24)  # any size: resized to the tower's 32x32
    out = enc(images)
    k = len(enc.layers)
    assert out.layer_tokens.shape == (2, k, 1 + 16, enc.hidden_size)  # CLS + 4x4 patches
    assert out.image_embeds.shape == (2, enc.embed_dim)
    # The last block's tokens are the tower's final tokens (before ln_post): check via output_tokens.
    enc.visual.output_tokens = True
    try:
        _, tokens = enc.visual(enc.preprocess(images))
    finally:
        enc.visual.output_tokens = False
    torch.testing.assert_close(enc.visual.ln_post(out.layer_tokens[:, -1, 1:]), tokens)
    mapped = mapper(out.layer_tokens)
    assert mapped.shape == (2, k, 32)
    with pytest.raises(ValueError, match="layer_tokens"):
        mapper(out.layer_tokens[:, :1])
    with pytest.raises(ValueError, match="images"):
        enc(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="layers"):
        vb.VideoBoothImageEncoder(enc.visual, layers=(7,))
    with pytest.raises(TypeError, match="visual"):
        vb.VideoBoothImageEncoder(torch.nn.Linear(2, 2))
