"""The Llama 3 decoder: paper shapes, FFN sizing, document mask, causality, GQA."""
import pytest
import torch

from llm.model import Llama, LlamaConfig, count_params, document_mask, flops_per_token, shape_config


@pytest.mark.parametrize("shape,billions", [("8b", 8.0), ("70b", 70.6), ("405b", 405.9)])
def test_paper_shapes_parameter_counts(shape, billions):
    n = count_params(shape_config(shape))["total"] / 1e9
    assert abs(n - billions) / billions < 0.01, n


def test_ffn_sizing_rule_matches_table3():
    assert [shape_config(s).ffn_dim for s in ("8b", "70b", "405b")] == [14336, 28672, 53248]


def tiny(**kw) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **kw)
    return Llama(cfg).eval()


def test_document_mask_isolates_packed_documents():
    m = tiny()
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 11 + [1] * 9])
    out = m(packed, doc_ids=doc)
    # RoPE scores depend only on relative positions, so each document alone must give the same logits
    torch.testing.assert_close(out[:, :11], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 11:], m(b), atol=1e-5, rtol=1e-5)
    # without the mask the second document does see the first
    assert not torch.allclose(m(packed)[:, 11:], m(b), atol=1e-3)


def test_causal_future_tokens_do_not_change_the_past():
    m = tiny()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 97
    torch.testing.assert_close(m(x)[:, :10], m(y)[:, :10])
    assert not torch.allclose(m(x)[:, 10:], m(y)[:, 10:])


def test_document_mask_shape_and_content():
    mask = document_mask(torch.tensor([[0, 0, 1, 1]]))
    assert mask.shape == (1, 1, 4, 4)
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_gqa_projection_sizes_and_untied_head():
    m = tiny()
    att = m.layers[0].attention
    assert att.wqkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert m.output.weight.data_ptr() != m.tok_embeddings.weight.data_ptr()


def test_embeds_input_equals_token_input_and_flops_grow_with_context():
    m = tiny()
    x = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(m(x), m(embeds=m.tok_embeddings(x)))
    cfg = m.cfg
    assert flops_per_token(cfg, 512) > flops_per_token(cfg, 128) > 6 * count_params(cfg)["non_embedding"]


def test_seeded_init_is_reproducible():
    a, b = tiny(), tiny()
    a.reset_parameters(seed=3)
    b.reset_parameters(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("chunk", [7, 1024])
def test_fused_loss_matches_plain_cross_entropy_and_gradients(chunk):
    from llm.loss import linear_cross_entropy

    m = tiny()
    x = torch.randint(0, 97, (3, 12))
    labels = torch.randint(0, 97, (3, 12))
    labels[0, :4] = -100
    plain = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    h = m(x, return_hidden=True)
    fused = linear_cross_entropy(h, m.output.weight, labels, chunk=chunk)
    (fused * 2).backward()  # the upstream gradient scales both paths alike
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, 2 * ref[n], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(m(x, labels=labels), plain, atol=1e-5, rtol=1e-5)
