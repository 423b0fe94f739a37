from gridvqa.data.text import PAD, UNK, build_tokenizer, encode, load_tokenizer, save_tokenizer

QUESTIONS = ["What color is the circle?", "How many red-squares / triangles are there?", "Is there a cube?"]


def test_mcan_cleaning_and_padding():
    tok = build_tokenizer(QUESTIONS)
    ids, mask = encode(tok, ["WHAT color is the Circle??", "is there a pyramid"])
    assert ids.shape == (2, 14) and mask.shape == (2, 14)
    assert tok.convert_ids_to_tokens(ids[0, :5].tolist()) == ["what", "color", "is", "the", "circle"]
    assert mask[0].sum() == 5 and not mask[0, 5:].any()
    assert tok.convert_ids_to_tokens(ids[1, :4].tolist()) == ["is", "there", "a", UNK]
    assert (ids[0, 5:] == tok.convert_tokens_to_ids(PAD)).all()
    # '-' and '/' split words as in MCAN.
    assert "red" in tok.get_vocab() and "squares" in tok.get_vocab()


def test_truncates_to_max_length():
    tok = build_tokenizer(QUESTIONS)
    ids, mask = encode(tok, [" ".join(["circle"] * 30)], max_length=14)
    assert ids.shape == (1, 14) and mask.all()


def test_save_and_reload_same_ids(tmp_path):
    tok = build_tokenizer(QUESTIONS)
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    a, _ = encode(tok, QUESTIONS)
    b, _ = encode(again, QUESTIONS)
    assert (a == b).all()


def test_lstm_question_encoder_runs_under_cpu_bfloat16_autocast():
    """`trainer.precision=bf16-mixed` on a CPU: autocast would pick a bfloat16 LSTM kernel many CPUs lack."""
    import torch

    from gridvqa.models.text_encoder import LSTMTextEncoder

    torch.manual_seed(0)
    enc = LSTMTextEncoder(vocab_size=20, hidden=16, word_dim=8)
    tokens = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    plain, _ = enc(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, mask = enc(tokens)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]
