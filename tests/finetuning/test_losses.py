import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from sparseft.data import IGNORE_INDEX
from sparseft.data.batch import model_inputs
from sparseft.finetuning.losses import (
    LossWeights,
    cross_entropy,
    distill_terms,
    kd_loss,
    squarehead_layer,
    squarehead_loss,
)


def test_squarehead_layer_matches_hand_computation_and_skips_padding():
    # batch 1, tokens 3 (the last is padding), hidden 2
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    t = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    mse = (0**2 + 1**2 + 1**2 + 2**2) / 4  # over the 2 real tokens x 2 dims
    scale = (1 + 1 + 4 + 4) / 4
    expected = mse / (scale + 1e-8)
    assert squarehead_layer(s, t, mask).item() == pytest.approx(expected, rel=1e-6)


def test_squarehead_sums_layers_and_uses_eps():
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 3, generator=gen) for _ in range(3)]
    t = [torch.randn(2, 4, 3, generator=gen) for _ in range(3)]
    mask = torch.ones(2, 4)
    terms = [((a - b) ** 2).mean() / ((b**2).mean() + 0.5) for a, b in zip(s, t, strict=True)]
    assert squarehead_loss(s, t, mask, eps=0.5).item() == pytest.approx(sum(terms).item(), rel=1e-6)
    # eps keeps an all-zero teacher finite: the term becomes mse / eps
    zero = [torch.zeros(1, 2, 3)]
    one = [torch.ones(1, 2, 3)]
    assert squarehead_loss(one, zero, torch.ones(1, 2), eps=0.25).item() == pytest.approx(4.0)


def test_kd_matches_hand_computation_on_label_tokens():
    z_s = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    z_t = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])  # the third token carries no label
    temp = 2.0

    def kl(t_row, s_row):
        p = [math.exp(v / temp) for v in t_row]
        q = [math.exp(v / temp) for v in s_row]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    expected = temp**2 * (kl([1.0, 0.0], [0.0, 1.0]) + kl([0.0, 0.0], [2.0, 0.0])) / 2
    assert kd_loss(z_s, z_t, mask, temp).item() == pytest.approx(expected, rel=1e-6)


def test_kd_is_teacher_first_forward_kl():
    z_s = torch.tensor([[[0.0, 3.0, 1.0]]])
    z_t = torch.tensor([[[2.0, 0.0, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    p_t = torch.softmax(z_t, -1)
    forward = (p_t * (p_t.log() - torch.log_softmax(z_s, -1))).sum()
    assert kd_loss(z_s, z_t, mask).item() == pytest.approx(forward.item(), rel=1e-6)
    assert kd_loss(z_s, z_t, mask).item() != pytest.approx(kd_loss(z_t, z_s, mask).item(), rel=1e-3)


def test_cross_entropy_ignores_masked_targets():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [9.0, -9.0]]])
    targets = torch.tensor([[0, 0, IGNORE_INDEX]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(2) + 1))) / 2
    assert cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def _outputs(logits, hidden):
    return SimpleNamespace(logits=logits, hidden_states=hidden, encoder_hidden_states=None)


def test_distill_terms_shift_and_weights_and_zero_when_student_is_teacher():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=gen)
    hidden = tuple(torch.randn(2, 5, 4, generator=gen) for _ in range(3))  # embeddings + 2 blocks
    batch = {
        "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }
    same = distill_terms(_outputs(logits, hidden), _outputs(logits, hidden), batch, LossWeights(1, 1, 1))
    assert same["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["squarehead"].item() == 0.0
    assert same["loss"].item() == pytest.approx(same["ce"].item(), rel=1e-6)
    # causal shift: logits at t predict labels at t+1
    assert same["ce"].item() == pytest.approx(cross_entropy(logits[:, :-1], batch["labels"][:, 1:]).item())

    other = tuple(h + 1.0 for h in hidden)
    w = LossWeights(ce=0.5, kd=2.0, squarehead=3.0)
    terms = distill_terms(_outputs(logits, hidden), _outputs(logits * 2, other), batch, w)
    assert terms["loss"].item() == pytest.approx(
        0.5 * terms["ce"].item() + 2.0 * terms["kd"].item() + 3.0 * terms["squarehead"].item(), rel=1e-6
    )
    # the embedding output (hidden[0]) is not compared: changing only it leaves SquareHead at zero
    moved = (hidden[0] + 5.0, *hidden[1:])
    only_emb = distill_terms(_outputs(logits, moved), _outputs(logits, hidden), batch, LossWeights(0, 0, 1))
    assert only_emb["squarehead"].item() == 0.0
    assert set(only_emb) == {"squarehead", "loss"}


def test_squarehead_gradient_flows_to_student_only():
    s = torch.randn(1, 3, 4, requires_grad=True)
    t = torch.randn(1, 3, 4)
    squarehead_loss([s], [t], torch.ones(1, 3)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_encoder_decoder_outputs_use_encoder_and_label_masks_without_shift():
    # The branch an encoder-decoder trainer will use: encoder blocks under the attention mask, decoder blocks
    # under the label mask, logits already aligned with the labels.
    gen = torch.Generator().manual_seed(2)
    enc = tuple(torch.randn(1, 3, 4, generator=gen) for _ in range(3))
    dec = tuple(torch.randn(1, 2, 4, generator=gen) for _ in range(3))
    logits = torch.randn(1, 2, 5, generator=gen)
    batch = {"attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([[2, IGNORE_INDEX]])}

    def outputs(enc_states, dec_states):
        return SimpleNamespace(
            logits=logits,
            encoder_last_hidden_state=enc_states[-1],
            encoder_hidden_states=enc_states,
            decoder_hidden_states=dec_states,
        )

    # changes only where the masks are 0 (padding of the encoder, unlabelled decoder token): no loss
    enc_pad = tuple(torch.cat([h[:, :2], h[:, 2:] + 9], dim=1) for h in enc)
    dec_pad = tuple(torch.cat([h[:, :1], h[:, 1:] + 9], dim=1) for h in dec)
    w = LossWeights(ce=1.0, squarehead=1.0)
    terms = distill_terms(outputs(enc, dec), outputs(enc_pad, dec_pad), batch, w)
    assert terms["squarehead"].item() == 0.0
    assert terms["ce"].item() == pytest.approx(cross_entropy(logits, batch["labels"]).item())
    moved = distill_terms(outputs(enc, dec), outputs(tuple(h + 1 for h in enc), dec), batch, w)
    expected = squarehead_loss(enc[1:], [h + 1 for h in enc[1:]], batch["attention_mask"])
    assert moved["squarehead"].item() == pytest.approx(expected.item(), rel=1e-6)


def _tiny_seq2seq(arch, seed):
    """A tiny T5 or Whisper and a padded batch laid out as `sparseft.data.batch.collate` lays it out."""
    torch.manual_seed(seed)
    special = {"vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    if arch == "t5":
        config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **special)
        model = transformers.T5ForConditionalGeneration(config).eval()
        encoder = {
            "input_ids": torch.randint(2, 64, (2, 6)),
            "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
        }
    else:
        config = transformers.WhisperConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=100,
            max_target_positions=32, bos_token_id=1, begin_suppress_tokens=None, suppress_tokens=None, **special,
        )  # fmt: skip
        model = transformers.WhisperForConditionalGeneration(config).eval()
        encoder = {"input_features": torch.randn(2, 16, 200)}
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, IGNORE_INDEX, IGNORE_INDEX]])
    shifted = torch.cat(
        [torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], dim=1
    )  # behind the start token
    decoder_input_ids = shifted.masked_fill(shifted == IGNORE_INDEX, 0)
    return model, {**encoder, "decoder_input_ids": decoder_input_ids, "labels": labels}


@pytest.mark.parametrize("arch", ["t5", "whisper"])
def test_encoder_decoder_ce_and_kd_line_up_without_hidden_states(arch):
    # CE-only and KD runs call the models without output_hidden_states, so their outputs hold no
    # encoder_hidden_states; logits and labels must still line up unshifted, as Hugging Face's own loss has them.
    student, batch = _tiny_seq2seq(arch, seed=0)
    teacher, _ = _tiny_seq2seq(arch, seed=1)
    with torch.no_grad():
        reference = student(**batch).loss
        out = student(**model_inputs(batch), use_cache=False)
        teacher_out = teacher(**model_inputs(batch), use_cache=False)
    assert out.encoder_hidden_states is None
    ce = distill_terms(out, None, batch, LossWeights(ce=1.0))["ce"]
    assert ce.item() == pytest.approx(reference.item(), rel=1e-5)
    kd = distill_terms(out, teacher_out, batch, LossWeights(ce=0.0, kd=1.0))["kd"]
    expected = kd_loss(out.logits, teacher_out.logits, batch["labels"] != IGNORE_INDEX)
    assert kd.item() == pytest.approx(expected.item(), rel=1e-5)
