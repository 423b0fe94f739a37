import pytest
import torch
import torch.nn.functional as F

from gridvqa.errors import ConfigError, DataError
from gridvqa.models.mcan import MCAN_SIZES, MCANLayerNorm, MCANOutput, build_mcan, mcan_config
from gridvqa.models.text_encoder import HFTextEncoder, LSTMTextEncoder, read_glove

C = 12  # visual feature width of the small test models
# The CPU configs' additions (conf/model/vqa.yaml); MCAN as published has none of them.
CPU_ADDITIONS = {"position_encoding": "sine", "box_embedding": True, "layer_norm": "torch"}


def tiny(visual_kind="grid", **kw):
    kw = {"hidden": 32, "flat_mlp": 32, "flat_out": 64, "ffn": 64, "word_dim": 16, **CPU_ADDITIONS, **kw}
    torch.manual_seed(0)
    m = build_mcan("tiny", num_answers=7, visual_dim=C, vocab_size=30, visual_kind=visual_kind, **kw)
    return m.eval()


def questions(b=3, t=6):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(1, 30, (b, t), generator=g)
    lengths = torch.tensor([t, 3, 1][:b])
    mask = torch.arange(t) < lengths[:, None]
    return q.masked_fill(~mask, 0), mask


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --- config ---------------------------------------------------------------------------------------


def test_sizes_are_mcan_vqa_small_and_large():
    # MILVLG/mcan-vqa cfgs/small_model.yml, cfgs/large_model.yml; FF_SIZE = 4 x HIDDEN_SIZE (base_cfgs.py)
    fields = ("layers", "hidden", "heads", "ffn", "dropout", "flat_mlp", "flat_glimpses", "flat_out")
    sizes = {name: tuple(getattr(MCAN_SIZES[name], f) for f in fields) for name in ("small", "large")}
    assert sizes["small"] == (6, 512, 8, 2048, 0.1, 512, 1, 1024)
    assert sizes["large"] == (6, 1024, 8, 4096, 0.1, 512, 1, 2048)
    for name in ("small", "large"):  # and nothing added to MCAN's inputs unless asked for
        cfg = MCAN_SIZES[name]
        assert (cfg.position_encoding, cfg.box_embedding, cfg.layer_norm) == ("none", False, "mcan")
        assert (cfg.text_encoder, cfg.word_dim) == ("lstm", 300)


def test_sizes_and_overrides():
    cfg = mcan_config("small", layers=2, position_encoding="sine")
    assert cfg.layers == 2 and cfg.hidden == 512 and MCAN_SIZES["small"].layers == 6
    # None keeps the size's value: how a paper-scale config undoes e2e.yaml's CPU-sized head overrides
    assert mcan_config("small", ffn=None, dropout=None) == MCAN_SIZES["small"]
    assert mcan_config("tiny", ffn=256, dropout=0.0).dropout == 0.0
    with pytest.raises(ConfigError, match="unknown config fields"):
        mcan_config("small", hiden=3)
    with pytest.raises(ConfigError, match="unknown size"):
        mcan_config("medium")
    with pytest.raises(ConfigError, match="not divisible"):
        mcan_config("tiny", heads=3)
    with pytest.raises(ConfigError, match="position_encoding"):
        mcan_config("tiny", position_encoding="rope")
    with pytest.raises(ConfigError, match="layer_norm 'batch'"):
        mcan_config("tiny", layer_norm="batch")


def test_param_counts_match_mcan():
    # VQA v2 setting: ~20k question words, 3129 answers, 2048-d features. MCAN-small is ~58M
    # parameters and MCAN-large ~201M; built on the meta device so nothing is allocated.
    with torch.device("meta"):
        small = build_mcan("small", num_answers=3129, visual_dim=2048, vocab_size=20573)
        large = build_mcan("large", num_answers=3129, visual_dim=2048, vocab_size=20573)
    assert 56e6 < n_params(small) < 60e6
    assert 195e6 < n_params(large) < 208e6
    assert len(small.encoder_decoder.encoder) == 6 and len(small.encoder_decoder.decoder) == 6
    assert large.encoder_decoder.encoder[0].att.mha.num_heads == 8
    assert large.encoder_decoder.decoder[0].ffn[0].out_features == 4096
    assert large.classifier.in_features == 2048
    assert small.encoder_decoder.decoder[0].guided_att.mha.num_heads == 8
    assert small.classifier.in_features == 1024
    assert isinstance(small.norm, MCANLayerNorm)
    assert isinstance(small.encoder_decoder.encoder[0].norm1, MCANLayerNorm)
    assert small.visual.pos_enc == "none" and small.visual.box_proj is None
    t = build_mcan("tiny", num_answers=3129, visual_dim=2048, vocab_size=20573)
    assert n_params(t) < n_params(small) / 5


# --- shapes and masks -----------------------------------------------------------------------------


def test_grid_map_and_tokens_shapes():
    m = tiny()
    q, qm = questions()
    assert m(q, qm, torch.randn(3, C, 4, 5)).shape == (3, 7)
    tokens, vm = torch.randn(3, 20, C), torch.ones(3, 20, dtype=torch.bool)
    assert m(q, qm, tokens, vm, grid_hw=(4, 5)).shape == (3, 7)
    assert m(q, None, tokens, vm, grid_hw=torch.tensor([[4, 5], [2, 3], [1, 1]])).shape == (3, 7)


def test_region_shapes_and_boxes_matter():
    m = tiny("region")
    q, qm = questions()
    feats, vm = torch.randn(3, 10, C), torch.ones(3, 10, dtype=torch.bool)
    xy = torch.rand(3, 10, 2) * 0.5
    boxes = torch.cat([xy, xy + 0.3], dim=-1)
    out = m(q, qm, feats, vm, boxes=boxes)
    assert out.shape == (3, 7)
    assert not torch.allclose(out, m(q, qm, feats, vm, boxes=boxes.flip(1)))
    with pytest.raises(ConfigError, match="need boxes"):
        m(q, qm, feats, vm)


def test_padding_does_not_change_logits_grid():
    m = tiny()
    q, qm = questions()
    feats = torch.randn(3, 9, C)
    vm = torch.ones(3, 9, dtype=torch.bool)
    vm[1, 4:] = False
    vm[2, 2:] = False
    hw = torch.tensor([[3, 3], [2, 2], [1, 2]])
    base = m(q, qm, feats, vm, grid_hw=hw)
    junk = feats.clone()
    junk[~vm] = float("nan")
    q_junk = q.masked_fill(~qm, 17)  # other token ids in the (right) padding
    assert torch.allclose(base, m(q_junk, qm, junk, vm, grid_hw=hw), atol=1e-6)
    # The mask is really used: unmasking the padding changes the answer scores.
    assert not torch.allclose(base, m(q, qm, feats, torch.ones_like(vm), grid_hw=hw))


def test_padded_map_equals_unpadded_image():
    # A 2x2 image padded into a 3x3 batch map (valid cells top-left) or into flat tokens must
    # score exactly like the 2x2 map alone: masks and per-image grid positions agree.
    m = tiny()
    q, qm = questions(1)
    small = torch.randn(1, C, 2, 2)
    padded = torch.randn(1, C, 3, 3)
    padded[:, :, :2, :2] = small
    pmask = torch.zeros(1, 3, 3, dtype=torch.bool)
    pmask[:, :2, :2] = True
    tokens = torch.cat([small.flatten(2).transpose(1, 2), torch.randn(1, 5, C)], dim=1)
    tmask = torch.arange(9)[None] < 4
    ref = m(q, qm, small)
    assert torch.allclose(ref, m(q, qm, padded, pmask), atol=1e-5)
    assert torch.allclose(ref, m(q, qm, tokens, tmask, grid_hw=(2, 2)), atol=1e-5)


def test_padding_does_not_change_logits_region():
    m = tiny("region")
    q, qm = questions()
    feats, boxes = torch.randn(3, 6, C), torch.rand(3, 6, 4)
    vm = torch.ones(3, 6, dtype=torch.bool)
    vm[0, 3:] = False
    base = m(q, qm, feats, vm, boxes=boxes)
    feats2, boxes2 = feats.clone(), boxes.clone()
    feats2[~vm] = 1e4
    boxes2[~vm] = float("inf")
    assert torch.allclose(base, m(q, qm, feats2, vm, boxes=boxes2), atol=1e-6)


def test_attention_weights_sum_to_one_and_zero_on_padding():
    m = tiny()
    q, qm = questions()
    feats = torch.randn(3, 9, C)
    vm = torch.ones(3, 9, dtype=torch.bool)
    vm[1, 5:] = False
    out = m(q, qm, feats, vm, grid_hw=(3, 3), return_attention=True)
    assert isinstance(out, MCANOutput)
    # The explicit-weights path and the fused SDPA path compute the same thing.
    assert torch.allclose(out.logits, m(q, qm, feats, vm, grid_hw=(3, 3)), atol=1e-5)
    a = out.attention
    assert a["v_flat"].shape == (3, 9) and a["q_flat"].shape == (3, 6)
    assert len(a["guided"]) == len(a["v_self"]) == len(a["q_self"]) == 2
    for w, mask in [(a["v_flat"], vm), (a["q_flat"], qm)]:
        assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-5)
        assert (w[~mask] == 0).all()
    for g in a["guided"]:
        assert g.shape == (3, 9, 6)
        assert torch.allclose(g.sum(-1), torch.ones(3, 9), atol=1e-5)
        assert (g.masked_select(~qm[:, None, :]) == 0).all()
    for s in a["v_self"]:
        assert torch.allclose(s.sum(-1), torch.ones(3, 9), atol=1e-5)
        assert (s.masked_select(~vm[:, None, :]) == 0).all()
    assert a["grid_hw"].tolist() == [[3, 3]] * 3


def test_empty_sample_gives_no_nan():
    m = tiny()
    q, qm = questions()
    vm = torch.ones(3, 4, dtype=torch.bool)
    vm[0] = False
    qm = qm.clone()
    qm[2] = False
    assert torch.isfinite(m(q, qm, torch.randn(3, 4, C), vm, grid_hw=(2, 2))).all()


def test_gradient_reaches_visual_input_and_not_padding():
    m = tiny().train()
    q, qm = questions()
    feats = torch.randn(3, C, 3, 3, requires_grad=True)
    vm = torch.ones(3, 3, 3, dtype=torch.bool)
    vm[0, 2, :] = False
    m(q, qm, feats, vm).sum().backward()
    grad = feats.grad.permute(0, 2, 3, 1)  # [B, h, w, C]
    assert grad[vm].abs().sum(-1).gt(0).all()
    assert (grad[~vm] == 0).all()
    assert all(p.grad is not None for n, p in m.named_parameters() if "row_embed" not in n)


def test_learned_positions_and_input_errors():
    m = tiny(position_encoding="learned", max_grid=4)
    q, qm = questions()
    assert m(q, qm, torch.randn(3, C, 4, 3)).shape == (3, 7)
    with pytest.raises(ConfigError, match="max_grid"):
        m(q, qm, torch.randn(3, C, 5, 2))
    with pytest.raises(ConfigError, match="built for 12-d"):
        m(q, qm, torch.randn(3, C + 1, 2, 2))
    with pytest.raises(ConfigError, match="need grid_hw"):
        m(q, qm, torch.randn(3, 4, C))
    assert tiny(position_encoding="none")(q, qm, torch.randn(3, 4, C)).shape == (3, 7)


def test_mcan_layer_norm_matches_a_hand_computation():
    ln = MCANLayerNorm(4)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        ln.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    # mean 3; unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3; eps 1e-6 added to the std, not the variance
    std = (14 / 3) ** 0.5
    rows = zip([1, 2, 3, 6], [1, 2, 0.5, -1], [0, 1, -1, 3], strict=True)
    expected = [a * (v - 3) / (std + 1e-6) + b for v, a, b in rows]
    got = ln.double()(x)[0].tolist()
    ln.float()
    assert got == pytest.approx(expected, rel=1e-12)
    # torch's LayerNorm (biased variance, eps under the root) is a different function
    torch_ln = torch.nn.functional.layer_norm(x, (4,))[0]
    assert not torch.allclose(torch_ln, torch.tensor([(v - 3) / (std + 1e-6) for v in [1, 2, 3, 6]],
                                                      dtype=torch.float64))
    assert ln(x.to(torch.bfloat16)).dtype == torch.float32  # statistics in float32 under bf16 inputs


def test_mcan_defaults_add_nothing_to_the_visual_features():
    q, qm = questions()
    # Grid: without a position encoding, the head cannot tell cells apart, so permuting them (and the
    # mask with them) leaves every answer score unchanged; the CPU addition makes it position-aware.
    feats = torch.randn(3, C, 3, 3)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    shuffled = feats.flatten(2)[:, :, perm].view(3, C, 3, 3)
    plain = tiny(position_encoding="none", box_embedding=False, layer_norm="mcan")
    assert torch.allclose(plain(q, qm, feats), plain(q, qm, shuffled), atol=1e-5)
    sine = tiny(position_encoding="sine")
    assert not torch.allclose(sine(q, qm, feats), sine(q, qm, shuffled), atol=1e-4)
    # Regions: MCAN ignores the boxes (none needed); the box embedding makes them matter.
    region = tiny("region", position_encoding="none", box_embedding=False, layer_norm="mcan")
    assert region.visual.box_proj is None
    rf, rm = torch.randn(3, 5, C), torch.ones(3, 5, dtype=torch.bool)
    boxes = torch.rand(3, 5, 4)
    assert torch.equal(region(q, qm, rf, rm), region(q, qm, rf, rm, boxes=boxes))
    assert not any("pos" in n or "row_embed" in n or "box" in n for n, _ in plain.named_parameters())


# --- question encoders ----------------------------------------------------------------------------


def test_glove_init_from_local_file(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "cube": 3, "new": 4, "missing": 5}
    path = tmp_path / "glove.txt"
    path.write_text(
        "the 9 9 9 9\n"
        "Red 1 1 1 1\n"  # only a cased form: used for "red"
        "red 1 2 3 4\n"  # the exact form wins
        "cube 0.5 -0.5 0 2e-1\n"
        "new york 7 7 7 7\n"  # a token with a space: not the word "new"
        "new 5 5 5 5\n",
        encoding="utf-8",
    )
    torch.manual_seed(0)
    enc = LSTMTextEncoder(len(vocab), hidden=8, word_dim=4, glove_path=path, vocab=vocab)
    assert enc.glove_found == 3
    w = enc.embed.weight
    assert w[2].tolist() == [1, 2, 3, 4]
    assert torch.allclose(w[3], torch.tensor([0.5, -0.5, 0.0, 0.2]))
    assert w[4].tolist() == [5, 5, 5, 5]
    assert (w[0] == 0).all() and w[5].abs().sum() > 0  # pad row zero, missing word keeps random init
    feats, mask = enc(torch.tensor([[2, 3, 0]]))
    assert feats.shape == (1, 3, 8) and mask.tolist() == [[True, True, False]]

    assert read_glove(path, {"red": 0}, dim=4)["red"].tolist() == [1, 2, 3, 4]
    with pytest.raises(DataError, match=r"glove\.txt: line 1: 4-d vectors, but the embedding is 300-d"):
        read_glove(path, {"red": 0}, dim=300)
    bad = tmp_path / "bad.txt"
    bad.write_text("2 4\nred 1 2 3 4\ncube 1 x 3 4\nnew 1 2\n", encoding="utf-8")  # word2vec header skipped
    with pytest.raises(DataError, match=r"bad\.txt: line 3: non-numeric"):
        read_glove(bad, {"cube": 0}, dim=4)
    with pytest.raises(DataError, match=r"bad\.txt: line 4: expected 4 numbers after 'new', found 2"):
        read_glove(bad, {"new": 0}, dim=4)
    assert read_glove(bad, {"red": 0}, dim=4)["red"].tolist() == [1, 2, 3, 4]
    with pytest.raises(DataError, match="not found"):
        read_glove(tmp_path / "nope.txt", vocab, dim=4)


def test_mcan_with_glove(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2}
    (tmp_path / "g.txt").write_text("red 1 2 3 4\n", encoding="utf-8")
    m = build_mcan("tiny", num_answers=3, visual_dim=C, vocab_size=3, vocab=vocab, word_dim=4,
                   glove_path=tmp_path / "g.txt")
    assert m.text.glove_found == 1 and m.text.embed.weight[2].tolist() == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="vocabulary"):
        build_mcan("tiny", num_answers=3, visual_dim=C, vocab_size=3, word_dim=4,
                   glove_path=tmp_path / "g.txt")


def test_transformers_text_encoder_offline(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    m = build_mcan("tiny", num_answers=5, visual_dim=C, text_encoder="hf",
                   text_model_path=str(tmp_path / "bert"), freeze_text=True,
                   hidden=32, flat_mlp=32, flat_out=64, ffn=64).eval()
    assert isinstance(m.text, HFTextEncoder)
    q, qm = questions()
    out = m(q, qm, torch.randn(3, C, 2, 2))
    assert out.shape == (3, 5)
    m.train()
    assert not m.text.model.training and m.text.proj.training
    assert not any(p.requires_grad for p in m.text.model.parameters())
    with pytest.raises(ConfigError, match="not found"):
        HFTextEncoder(tmp_path / "missing", hidden=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load"):
        HFTextEncoder(tmp_path / "empty", hidden=8)


# --- learning -------------------------------------------------------------------------------------

ROWS, COLS = ["top", "middle", "bottom"], ["left", "centre", "right"]


def colour_task(n, g):
    """3x3 grid of 4 colours (one-hot features); 'what colour top left' -> colour at that cell."""
    colours = torch.randint(0, 4, (n, 3, 3), generator=g)
    feats = F.one_hot(colours, 4).float().permute(0, 3, 1, 2)
    r, c = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    q = torch.zeros(n, 6, dtype=torch.long)  # 2 padding tokens at the end
    q[:, 0], q[:, 1], q[:, 2], q[:, 3] = 1, 2, 3 + r, 6 + c
    return q, q != 0, feats, colours[torch.arange(n), r, c]


def test_tiny_head_learns_where_a_colour_is():
    torch.manual_seed(1)
    # One-hot colours carry no position: the sine position encoding (a CPU addition) tells cells apart.
    m = build_mcan("tiny", num_answers=4, visual_dim=4, vocab_size=9, dropout=0.0, word_dim=32,
                   hidden=64, flat_mlp=64, flat_out=128, ffn=256, **CPU_ADDITIONS)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run several times faster without thread hand-offs
    try:
        for _ in range(500):
            q, qm, v, y = colour_task(64, g)
            loss = F.cross_entropy(m(q, qm, v), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.01:
                break
        m.eval()
        q, qm, v, y = colour_task(1000, torch.Generator().manual_seed(2))
        with torch.no_grad():
            acc = (m(q, qm, v).argmax(-1) == y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc > 0.95  # chance is 0.25, and the question alone says nothing about the answer


# --- state dicts that call the encoder-decoder `backbone` (mcan-vqa's name) ---------------------------


def _as_mcan_vqa_names(state, prefix=""):
    """The state dict with the encoder-decoder's keys under mcan-vqa's attribute name, `backbone`."""
    old, new = prefix + "encoder_decoder.", prefix + "backbone."
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


def test_state_dict_with_backbone_keys_loads_with_identical_outputs():
    trained = tiny()
    state = _as_mcan_vqa_names(trained.state_dict())
    assert any(k.startswith("backbone.encoder.") for k in state)
    torch.manual_seed(1)
    fresh = build_mcan("tiny", num_answers=7, visual_dim=C, vocab_size=30, hidden=32, flat_mlp=32,
                       flat_out=64, ffn=64, word_dim=16, **CPU_ADDITIONS).eval()
    q, qm = questions()
    v = torch.randn(3, C, 4, 5)
    assert not torch.equal(fresh(q, qm, v), trained(q, qm, v))
    fresh.load_state_dict(state)  # strict: every key lands
    assert torch.equal(fresh(q, qm, v), trained(q, qm, v))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))


def test_vqa_checkpoint_with_head_backbone_keys_loads_and_keeps_the_resnet(tmp_path):
    # A pixels model has a real `backbone` (the ResNet) beside the head: only `head.backbone.*` is renamed.
    from gridvqa.data.text import build_tokenizer, encode
    from gridvqa.inference import load_model
    from gridvqa.lit.vqa_module import VQAModule

    tok = build_tokenizer(["what color is the circle", "how many squares"])
    torch.manual_seed(0)
    model = VQAModule(source="pixels", head={"size": "tiny"}, answers=["red", "blue", "2"],
                      tokenizer_json=tok.backend_tokenizer.to_str(),
                      backbone={"name": "R-tiny", "freeze_at": 0, "norm": "FrozenBN"}).eval()
    state = _as_mcan_vqa_names(model.state_dict(), prefix="head.")
    assert any(k.startswith("head.backbone.") for k in state)
    assert any(k.startswith("backbone.") for k in state)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams)}, path)
    loaded = load_model(path)  # refuses a checkpoint with missing or unexpected keys
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    q_ids, q_mask = encode(loaded.tokenizer, ["what color is the circle"], max_length=14)
    batch = {"images": torch.randn(1, 3, 64, 64), "pixel_mask": torch.ones(1, 64, 64, dtype=torch.bool),
             "q_ids": q_ids, "q_mask": q_mask, "img_index": torch.zeros(1, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
